"""The real participant workflow end to end: tiny phantoms, a real nnU-Net model, MultiProc on CPU.

Checks every derivative, resumption (a rerun is a no-op), a run killed mid-way and rerun giving
byte-identical outputs, an untouched input dataset, concurrent participants into one output folder,
and a run with network sockets blocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

pytestmark = pytest.mark.slow

PREFIXES = ["sub-01_ses-01", "sub-01_ses-02", "sub-02_ses-01", "sub-02_ses-02"]


def _snapshot(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part in skip for part in p.relative_to(root).parts)
    }


def _derivative_snapshot(out: Path) -> dict[str, bytes]:
    # Logs, figures and reports describe the run itself (run id, timings): not compared.
    snap = _snapshot(out, skip=("log", "figures"))
    return {k: v for k, v in snap.items() if not k.endswith(".html")}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bids_cl.synth import generate_dataset

    root = tmp_path_factory.mktemp("phantom") / "bids"
    generate_dataset(root, participants=2, sessions=2, seed=11, size="tiny", field="3T",
                     sequence="mp2rage", lesion_free_fraction=0.0)
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The shipped demo model when present, else a briefly trained tiny nnU-Net dark-blob model."""
    from bids_cl.engine.registry import packaged_model_dir

    demo = packaged_model_dir("demo")
    if (demo / "bids_cl_model.json").is_file() or any(demo.glob("**/checkpoint_final.pth")):
        return "demo"
    from bids_cl.engine import testing

    plans = testing.tiny_plans(spacing=(2.0, 2.0, 2.0))
    dataset = testing.tiny_dataset_json()
    weights = testing.train_blob_weights(plans, dataset, steps=60)
    folder = tmp_path_factory.mktemp("model") / "tiny_model"
    testing.write_model_folder(folder, plans, dataset, {0: weights})
    return str(folder)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("templateflow")
    return {**os.environ, "TEMPLATEFLOW_HOME": str(home), "NIPYPE_NO_ET": "1",
            "BIDS_CL_HOME": str(tmp_path_factory.mktemp("bids_cl_home"))}


def _command(phantom: Path, out: Path, work: Path, model: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bids_cl", str(phantom), str(out), "participant",
            "--model", model, "-w", str(work), "--nprocs", "2", "--omp-nthreads", "1",
            "--device", "cpu", "--sloppy", "--skip-bids-validation", *extra]


def _run(cmd: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def first_run(phantom: Path, model: str, env: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("run1")
    before = _snapshot(phantom)
    cmd = _command(phantom, base / "out", base / "work", model)
    start = time.perf_counter()
    proc = _run(cmd, env)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": base / "out", "work": base / "work", "cmd": cmd, "proc": proc,
            "seconds": elapsed, "input_before": before}


def test_every_expected_derivative(first_run: dict, phantom: Path) -> None:
    out: Path = first_run["out"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids_cl"
    assert (out / ".bidsignore").is_file()
    for prefix in PREFIXES:
        sub, ses = prefix.split("_")
        anat = out / sub / ses / "anat"
        expected = [
            "desc-brain_mask.nii.gz", "desc-brain_mask.json",
            "desc-preproc_T1w.nii.gz", "desc-preproc_T1w.json",
            "label-CL_probseg.nii.gz", "label-CL_probseg.json",
            "label-CL_mask.nii.gz", "label-CL_mask.json",
            "label-CL_desc-lesions_stats.tsv", "label-CL_desc-lesions_stats.json",
            "label-CL_desc-summary_stats.json",
            "space-MNI152NLin2009aSym_label-CL_mask.nii.gz",
            "space-MNI152NLin2009aSym_label-CL_probseg.nii.gz",
            "from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5",
        ]
        for name in expected:
            assert (anat / f"{prefix}_{name}").is_file(), f"missing {prefix}_{name}"
        mask_meta = json.loads((anat / f"{prefix}_label-CL_mask.json").read_text())
        assert mask_meta["Type"] == "Lesion"
        assert mask_meta["Sources"][0].startswith("bids:raw:")
        assert {"Threshold", "Connectivity", "MinLesionSize", "Model"} <= set(mask_meta)
        # no --threshold given: the model's own (the demo carries one) or nnU-Net's 0.5, and which it was
        from bids_cl.engine import load_model

        used_model = load_model(first_run["cmd"][first_run["cmd"].index("--model") + 1])
        tuned = used_model.tuned_threshold
        assert (mask_meta["Threshold"], mask_meta["ThresholdSource"]) == \
            ((tuned, "model") if tuned is not None else (0.5, "default"))
        tuned_size = used_model.tuned_min_lesion_size_ul  # the same for the minimum lesion size
        assert (mask_meta["MinLesionSize"], mask_meta["MinLesionSizeSource"]) == \
            ((f"{tuned_size:g}uL", "model") if tuned_size is not None else (None, "default"))
        assert json.loads((anat / f"{prefix}_desc-preproc_T1w.json").read_text())["SkullStripped"]

        # The outputs lie exactly on the input grid.
        source = nib.load(next((phantom / sub / ses / "anat").glob("*_UNIT1.nii.gz")))
        mask_img = nib.load(anat / f"{prefix}_label-CL_mask.nii.gz")
        prob_img = nib.load(anat / f"{prefix}_label-CL_probseg.nii.gz")
        for img in (mask_img, prob_img):
            assert img.shape == source.shape
            assert np.allclose(img.affine, source.affine, atol=1e-5)

        # Lesion count = connected components (26-connectivity) of the mask = rows of the table.
        mask = np.asarray(mask_img.dataobj) > 0
        _, n_components = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        table = pd.read_csv(anat / f"{prefix}_label-CL_desc-lesions_stats.tsv", sep="\t")
        summary = json.loads((anat / f"{prefix}_label-CL_desc-summary_stats.json").read_text())
        assert summary["LesionCount"] == n_components == len(table)
        if len(table):
            assert {"template_x", "template_y", "template_z", "uncertainty"} <= set(table.columns)
    assert (out / "sub-01" / "log").is_dir()
    assert "cortical lesion" in first_run["proc"].stdout
    # Nipype's INFO chatter (parent and MultiProc workers) goes to the run log, not to the console.
    console = first_run["proc"].stdout + first_run["proc"].stderr
    assert "[Node]" not in console and "nipype.workflow INFO" not in console, console[-2000:]
    run_logs = list((out / "sub-01" / "log").glob("*/bids_cl.log"))
    assert run_logs and "[Node] Executing" in run_logs[0].read_text()


def test_multiproc_workers_are_forked_unless_asked_otherwise() -> None:
    # The clean console above relies on forked workers inheriting bids_cl's logging set-up; Python 3.14
    # defaults to forkserver, so the plugin settings name fork themselves. A user's choice still wins.
    import dataclasses

    from bids_cl.cli.workflow import plugin_settings
    from bids_cl.config import ResolvedRun, RunConfig

    cfg = RunConfig(bids_dir=Path("/in"), output_dir=Path("/out"), analysis_level="participant")
    resolved = ResolvedRun(device="cpu", nprocs=2, omp_nthreads=1, mem_mb=None, model="demo",
                           random_seed=cfg.random_seed)
    plugin, args = plugin_settings(cfg, resolved)
    assert plugin == "MultiProc" and args["mp_context"] == "fork"
    cfg = dataclasses.replace(cfg, plugin_args={"mp_context": "spawn"})
    assert plugin_settings(cfg, resolved)[1]["mp_context"] == "spawn"


def test_input_dataset_untouched(first_run: dict, phantom: Path) -> None:
    assert _snapshot(phantom) == first_run["input_before"]


def test_derivative_names_pass_bids_validator(first_run: dict) -> None:
    from bids_cl.utils.bids import find_bids_validator

    command = find_bids_validator()
    if command is None:
        pytest.skip("the BIDS validator is not installed")
    proc = subprocess.run([*command, str(first_run["out"])], capture_output=True, text=True,
                          timeout=300, check=False)
    errors = [ln for ln in proc.stdout.splitlines() if "[ERROR]" in ln]
    assert errors == [], proc.stdout[-4000:]


def test_rerun_is_a_fast_no_op(first_run: dict, env: dict[str, str]) -> None:
    before = _derivative_snapshot(first_run["out"])
    start = time.perf_counter()
    proc = _run(first_run["cmd"], env)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _derivative_snapshot(first_run["out"]) == before
    print(f"first run {first_run['seconds']:.1f} s, rerun {elapsed:.1f} s")
    assert elapsed < first_run["seconds"]


def test_killed_run_resumes_to_identical_outputs(first_run: dict, phantom: Path, model: str,
                                                env: dict[str, str], tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = _command(phantom, out, work, model, "--participant-label", "01")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    # Kill once the first segmentation finished but before the run is complete.
    while time.time() < deadline and proc.poll() is None:
        if list(work.glob("**/segment/result_segment.pklz")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = _run(cmd, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reference = {k: v for k, v in _derivative_snapshot(first_run["out"]).items()
                 if not k.startswith("sub-02")}
    assert _derivative_snapshot(out) == reference


# Where each stage is running: a file or folder that appears when it starts (relative to work or out).
STAGE_MARKERS = [
    ("skull stripping", "work", "**/skullstrip"),
    ("segmentation", "work", "**/segment"),
    ("registration", "work", "**/register"),
    ("writing", "out", "sub-01/ses-*/anat/*"),
]


def test_kill_at_every_stage_then_rerun_is_identical(first_run: dict, phantom: Path, model: str,
                                                     env: dict[str, str], tmp_path: Path) -> None:
    """kill -9 while skull stripping, segmenting, registering and writing; each run resumes the last;
    the final derivatives are byte-identical to an uninterrupted run's and no temporary is left."""
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = _command(phantom, out, work, model, "--participant-label", "01")
    killed = []
    for stage, where, pattern in STAGE_MARKERS:
        root = work if where == "work" else out
        before = set(root.glob(pattern)) if root.exists() else set()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if root.exists() and set(root.glob(pattern)) - before:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed.append(stage)
        proc.wait()
    assert len(killed) >= 3, f"only interrupted during {killed}"
    rerun = _run(cmd, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reference = {k: v for k, v in _derivative_snapshot(first_run["out"]).items()
                 if not k.startswith("sub-02")}
    assert _derivative_snapshot(out) == reference
    assert not [p for p in out.rglob("*") if p.name.startswith(".bids_cl-tmp.")]


def test_concurrent_participants_and_no_network(phantom: Path, model: str, env: dict[str, str],
                                                tmp_path: Path) -> None:
    """Two participants at once into one output folder, with every socket connection refused."""
    blocker = tmp_path / "nonet"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import socket\n"
        "def _refuse(*args, **kwargs):\n"
        "    raise OSError('network access is blocked in this test')\n"
        "socket.socket.connect = _refuse\n"
        "socket.socket.connect_ex = _refuse\n"
        "socket.create_connection = _refuse\n"
        "socket.getaddrinfo = _refuse\n"
    )
    no_net = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker),
                                                                   env.get("PYTHONPATH")]))}
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(_command(phantom, out, tmp_path / f"work{label}", model,
                                  "--participant-label", label, "--nprocs", "1",
                                  "--output-spaces", "native"),
                         env=no_net, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for label in ("01", "02")
    ]
    results = [p.communicate(timeout=900) for p in procs]
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    for prefix in PREFIXES:
        sub, ses = prefix.split("_")
        summary = out / sub / ses / "anat" / f"{prefix}_label-CL_desc-summary_stats.json"
        assert json.loads(summary.read_text())["Space"] == []
    leftovers = [p for p in out.rglob(".*") if p.is_file() and p.name != ".bidsignore"]
    assert leftovers == []  # no temporary files left behind


def test_shared_segment_worker_gives_the_same_derivatives(first_run: dict, phantom: Path, model: str,
                                                          env: dict[str, str], tmp_path: Path) -> None:
    """--segment-worker shared (the default on a GPU) run here on the CPU: byte-identical derivatives
    to the nodes segmenting by themselves, the model set up once for the run's four targets, no worker
    (nor its socket folder) left when the run ends, and a rerun in the other mode finds every
    segmentation cached."""
    import re

    out, work = tmp_path / "out", tmp_path / "work"
    proc = _run(_command(phantom, out, work, model, "--segment-worker", "shared"), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _derivative_snapshot(out) == _derivative_snapshot(first_run["out"])
    timings = {}
    for path in out.glob("sub-*/log/*/timings.json"):
        timings.update(json.loads(path.read_text()))
    set_up = [t["segment.load_model"] for t in timings.values()]
    assert len(set_up) == len(PREFIXES) and sum(s > 0 for s in set_up) == 1
    log = next(out.glob("sub-01/log/*/bids_cl.log")).read_text()
    found = re.search(r"Shared segmentation worker \(pid (\d+)\) at (\S+)", log)
    assert found, log[-2000:]
    assert not Path(f"/proc/{found.group(1)}").exists()
    assert not Path(found.group(2)).parent.exists()
    # The other mode reuses the cache: no image is segmented again.
    segmented = {p: p.stat().st_mtime_ns for p in work.glob("**/segment/probseg.nii.gz")}
    assert len(segmented) == len(PREFIXES)
    rerun = _run(_command(phantom, out, work, model, "--segment-worker", "node"), env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in segmented} == segmented
