"""Every bad input, bad option and crafted file we know of, run through the real ``bids_cl`` command line.

For each case it prints the exit code, the last line on stderr, how many lines stderr had, what is left
on disk (output folder, work folder, temporary logs) and whether the input dataset is byte-identical
afterwards, as the markdown table of docs/reliability.md:

    python benchmarks/reliability.py [--keep DIR]

Run-level faults (kill -9 at each stage, a full disk while writing, concurrent runs) take minutes and
are proved by tests instead: tests/test_workflow_e2e.py and tests/test_outputs.py.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


def _image(path: Path, data: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.zeros((16, 16, 16), np.float32)
        data[4:12, 4:12, 4:12] = 100.0
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))


def _dataset(root: Path, suffix: str = "T1w") -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "reliability", "BIDSVersion": "1.10.0", "DatasetType": "raw"}))
    (root / "participants.tsv").write_text("participant_id\nsub-01\n")
    _image(root / "sub-01" / "anat" / f"sub-01_{suffix}.nii.gz")
    return root


def _snapshot(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class Case:
    name: str
    prepare: Callable[[Path, Path], list[str]]   # (case folder, dataset) -> extra command-line words
    dataset: str = "T1w"


def _truncate(ds: Path) -> None:
    path = ds / "sub-01/anat/sub-01_T1w.nii.gz"
    _image(path, np.random.default_rng(0).random((32, 32, 32)))
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.9)])


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _crafted_model(case: Path) -> str:
    """The demo model with an object whose unpickling would create a file, in its checkpoint's log."""
    import torch

    from bids_cl.engine.registry import packaged_model_dir

    marker = case / "payload_ran"

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - pickle protocol
            return (open, (str(marker), "w"))

    evil = case / "evil_model"
    shutil.copytree(packaged_model_dir("demo"), evil)
    (evil / "bids_cl_lock.json").unlink()
    ckpt = evil / "fold_0" / "checkpoint_final.pth"
    data = torch.load(ckpt, weights_only=True)
    data["logging"] = {"train_losses": [Payload()]}
    torch.save(data, ckpt)
    shutil.make_archive(str(case / "evil"), "zip", evil)
    return str(case / "evil.zip")


def _tampered_model(case: Path) -> str:
    from bids_cl.engine.registry import packaged_model_dir

    folder = case / "tampered_model"
    shutil.copytree(packaged_model_dir("demo"), folder)
    with open(folder / "fold_0" / "checkpoint_final.pth", "ab") as handle:
        handle.write(b"\0")
    return str(folder)


def _hold_lock(case: Path) -> list[str]:
    work = case / "work"
    work.mkdir(exist_ok=True)
    handle = open(work / ".bids_cl-lock-sub-01", "a+")  # noqa: SIM115 - held for the case
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD.append(handle)
    return ["--model", "demo", "--output-spaces", "native"]


_HELD: list = []

def _no_description(case: Path, ds: Path) -> list[str]:
    (ds / "dataset_description.json").unlink()
    return ["--dry-run"]


def _symlink_loop(case: Path, ds: Path) -> list[str]:
    (ds / "sub-01/anat/loop").symlink_to(ds / "sub-01")
    return ["--dry-run"]


def _filters(text: str) -> Callable[[Path, Path], list[str]]:
    return lambda case, ds: ["--bids-filter-file", _write(case / "f.json", text), "--dry-run"]


def _plugin(text: str) -> Callable[[Path, Path], list[str]]:
    return lambda case, ds: ["--use-plugin", _write(case / "p.yml", text), "--model", "demo"]


def _target(data: np.ndarray | None = None, *, empty: bool = False,
            truncated: bool = False) -> Callable[[Path, Path], list[str]]:
    def prepare(case: Path, ds: Path) -> list[str]:
        path = ds / "sub-01/anat/sub-01_T1w.nii.gz"
        if empty:
            path.write_bytes(b"")
        elif truncated:
            _truncate(ds)
        else:
            _image(path, data)
        return ["--model", "demo"]
    return prepare


NATIVE = ["--output-spaces", "native"]
CASES = [
    Case("unknown option", lambda c, d: ["--no-such-option"]),
    Case("unknown analysis level", lambda c, d: ["--dry-run"]),  # level replaced in run_case
    Case("no dataset_description.json", _no_description),
    Case("symbolic link loop in the dataset", _symlink_loop),
    Case("participant label not in the dataset", lambda c, d: ["--participant-label", "99", "--dry-run"]),
    Case("filters select nothing", _filters('{"t1w": {"acquisition": "none"}}')),
    Case("filter names an unknown entity", _filters('{"t1w": {"acqusition": "x"}}')),
    Case("filter value is a dict", _filters('{"t1w": {"run": {"a": 1}}}')),
    Case("invalid TOML in --config-file",
         lambda c, d: ["--config-file", _write(c / "c.toml", "[bids_cl\nx="), "--dry-run"]),
    Case("malformed plugin YAML", _plugin("plugin: [\n")),
    Case("unknown Nipype plugin", _plugin("plugin: NoSuch\n")),
    Case("graph plugin (SLURMGraph)", _plugin("plugin: SLURMGraph\n")),
    Case("a fold the model lacks (--folds 7)", lambda c, d: ["--model", "demo", "--folds", "7", *NATIVE]),
    Case("--synthstrip-model file missing",
         lambda c, d: ["--synthstrip-model", str(c / "none.pt"), "--dry-run"]),
    Case("0-byte image", _target(empty=True)),
    Case("truncated .nii.gz", _target(truncated=True)),
    Case("all-NaN image", _target(np.full((16,) * 3, np.nan))),
    Case("all-zero image", _target(np.zeros((16,) * 3))),
    Case("4-D image", _target(np.ones((8, 8, 8, 3)))),
    Case("no T1-weighted image", lambda c, d: ["--dry-run"], dataset="FLAIR"),
    Case("model not installed (--model published)", lambda c, d: ["--model", "published"]),
    Case("template not prefetched", lambda c, d: ["--model", "demo", "--output-spaces", "MNI152NLin6Asym"]),
    Case("output folder blocked by a file", lambda c, d: ["--model", "demo"]),  # output replaced in run_case
    Case("work folder in use by another run", lambda c, d: _hold_lock(c)),
    Case("crafted checkpoint (malicious __reduce__) in a zip",
         lambda c, d: ["--model", _crafted_model(c), *NATIVE]),
    Case("model folder whose files do not match its lock",
         lambda c, d: ["--model", _tampered_model(c), *NATIVE]),
]


def run_case(case: Case, root: Path) -> dict[str, object]:
    folder = root / case.name.replace(" ", "_").replace("/", "_")
    folder.mkdir()
    dataset = _dataset(folder / "bids", case.dataset)
    extra = case.prepare(folder, dataset)
    before = _snapshot(dataset)
    out = folder / "out"
    level = "participant"
    if case.name == "unknown analysis level":
        level = "subject"
    if case.name == "output folder blocked by a file":
        (folder / "blocker").write_text("a file")
        out = folder / "blocker" / "out"
    scratch = folder / "tmp"
    scratch.mkdir()
    env = {**os.environ, "NIPYPE_NO_ET": "1", "TMPDIR": str(scratch),
           "TEMPLATEFLOW_HOME": str(folder / "templateflow"), "BIDS_CL_HOME": str(folder / "home")}
    proc = subprocess.run([sys.executable, "-m", "bids_cl", str(dataset), str(out), level,
                           "--skip-bids-validation", "-w", str(folder / "work"), *extra],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    for handle in _HELD:
        handle.close()
    _HELD.clear()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    left = []
    if out.exists():
        left.append("output folder")
    work = folder / "work"
    if work.exists() and any(p.name != ".bids_cl-lock-sub-01" for p in work.iterdir()):
        left.append("work folder")
    if [p for p in scratch.iterdir() if p.name.startswith("bids_cl")]:
        left.append("/tmp log")
    if (folder / "payload_ran").exists():
        left.append("PAYLOAD RAN")
    return {"case": case.name, "code": proc.returncode, "lines": len(lines),
            "message": lines[-1] if lines else "", "left": ", ".join(left) or "nothing",
            "input": "identical" if _snapshot(dataset) == before else "CHANGED"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep the case folders here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bids_cl_reliability_")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    print("| case | exit | stderr lines | last stderr line | left on disk | input dataset |")
    print("|---|---|---|---|---|---|")
    try:
        for case in CASES:
            row = run_case(case, root)
            message = str(row["message"]).replace("|", "\\|").replace(str(root), "…")
            print(f"| {row['case']} | {row['code']} | {row['lines']} | {message} | {row['left']} | "
                  f"{row['input']} |", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
