"""Model folders, export zips, lock files, the registry and ``bids_cl-models`` (network: 127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bids_cl.engine import (
    cli,
    load_model,
    registry,
    resolve_model,
    segment,
    store,
    verify_lock_file,
    write_lock_file,
)
from bids_cl.engine import testing as T
from bids_cl.engine.lockfile import LOCK_NAME
from bids_cl.errors import BidsClError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plans, dj = T.tiny_plans(features=(4, 8)), T.tiny_dataset_json()
    plans["configurations"]["3d_fullres"]["patch_size"] = [16, 16, 16]
    weights = T.random_weights(plans, dj, seed=1)
    return T.write_model_folder(tmp_path_factory.mktemp("m") / "model", plans, dj, {0: weights, 1: weights},
                                settings={"name": "tiny", "warning": "synthetic"})


@pytest.fixture(scope="module")
def model_zip(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return T.export_zip(model_dir, tmp_path_factory.mktemp("zip") / "Dataset999_BidsClTest.zip")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BIDS_CL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_lock_file_roundtrip_and_tampering(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert verify_lock_file(copy) == [f"no lock file ({LOCK_NAME}) in {copy}"]
    lock = json.loads(write_lock_file(copy, source={"doi": "x"}).read_text())
    assert set(lock["files"]) == {"plans.json", "dataset.json", "bids_cl_model.json",
                                  "fold_0/checkpoint_final.pth", "fold_1/checkpoint_final.pth"}
    assert lock["files"]["plans.json"] == hashlib.sha256((copy / "plans.json").read_bytes()).hexdigest()
    assert verify_lock_file(copy) == []
    with open(copy / "fold_1" / "checkpoint_final.pth", "ab") as fh:
        fh.write(b"\0")
    (copy / "fold_2").mkdir()
    (copy / "fold_2" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    (copy / "dataset.json").unlink()
    problems = verify_lock_file(copy)
    assert any("changed file" in p and "fold_1" in p for p in problems)
    assert any("not in the lock" in p and "fold_2" in p for p in problems)
    assert any("missing file: dataset.json" in p for p in problems)


def test_load_folder_zip_and_layouts(model_dir: Path, model_zip: Path, home: Path, tmp_path: Path) -> None:
    model = load_model(model_dir)
    assert model.available_folds == [0, 1] and model.orientation == "RAS"
    prov = model.provenance
    assert prov["trust"] == "unverified source" and prov["warning"] == "synthetic" and prov["folds"] == [0, 1]
    assert prov["dataset"] == T.DATASET_NAME and prov["plans"] == "nnUNetPlans"
    assert prov["files"]["plans.json"] == hashlib.sha256((model_dir / "plans.json").read_bytes()).hexdigest()

    zipped = load_model(model_zip)  # export-zip layout: <dataset>/<trainer>__<plans>__<config>/
    assert zipped.model_dir.name == "nnUNetTrainer__nnUNetPlans__3d_fullres"
    # No lock came with the zip: locked by bids_cl only after every checkpoint loaded safely.
    assert zipped.resolved.trust == "unverified source" and (home / "models" / "_archives").is_dir()
    assert zipped.provenance["source"]["origin"] == "unverified source"
    assert load_model(model_zip).model_dir == zipped.model_dir  # unpacked once, reused
    shape = (24, 26, 22)
    img = T.phantom(shape, T.centred_affine(shape), brain_radii=(10, 11, 9), blobs=[((1, 1, 1), 1.5)])
    from_zip = segment(img, zipped, device="cpu", nthreads=1).probability.get_fdata()
    from_folder = segment(img, model, device="cpu", nthreads=1).probability.get_fdata()
    assert from_zip.shape == shape and np.array_equal(from_zip, from_folder)

    # checkpoint_best only, plans/dataset one level up from the fold folders' parent is not allowed,
    # but the standard layout (plans next to fold_*) with best checkpoints is.
    best = tmp_path / "best"
    shutil.copytree(model_dir, best)
    for fold in ("fold_0", "fold_1"):
        (best / fold / "checkpoint_final.pth").rename(best / fold / "checkpoint_best.pth")
    assert load_model(best).provenance["checkpoints"] == {"0": "checkpoint_best.pth",
                                                          "1": "checkpoint_best.pth"}
    nested = tmp_path / "nested"
    shutil.copytree(model_dir, nested / "inner")
    (nested / "inner" / "plans.json").rename(nested / "plans.json")
    assert load_model(nested).model_dir == nested / "inner"
    with pytest.raises(BidsClError) as err:
        load_model(tmp_path / "nested" / "inner")  # plans.json is above the folder given
    assert err.value.code == 65


def test_missing_and_unknown_models(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(BidsClError) as err:
        resolve_model(registry.PUBLISHED_MODEL)
    assert err.value.code == 66 and f"bids_cl-models install {registry.PUBLISHED_MODEL}" in str(err.value)
    with pytest.raises(BidsClError) as err:
        resolve_model("no-such-model")
    assert err.value.code == 66
    monkeypatch.setattr(registry, "packaged_model_dir", lambda name: tmp_path / "absent" / name)
    with pytest.raises(BidsClError) as err:
        load_model("demo")
    assert err.value.code == 66
    rows = {r["name"]: r for r in registry.list_models()}
    assert rows["demo"]["status"] == "not available"
    assert rows[registry.PUBLISHED_MODEL]["status"] == "not available"


def test_packaged_demo_requires_its_lock(model_dir: Path, home: Path, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    demo = tmp_path / "pkg" / "demo"
    shutil.copytree(model_dir, demo)
    monkeypatch.setattr(registry, "packaged_model_dir", lambda name: tmp_path / "pkg" / name)
    with pytest.raises(BidsClError):
        load_model("demo")  # present but unlocked: refused by name
    write_lock_file(demo)
    assert load_model("demo").provenance["trust"] == "lock"
    assert {r["name"]: r["status"] for r in registry.list_models()}["demo"] == "installed"


class _FakeZenodo(http.server.BaseHTTPRequestHandler):
    archive: bytes = b""
    record: dict = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.path.rstrip("/") == "/api/records/15911797":
            body, ctype = json.dumps(self.record).encode(), "application/json"
        elif self.path == "/files/cl_model.zip/content":
            body, ctype = self.archive, "application/zip"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def zenodo(model_zip: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_FakeZenodo]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeZenodo)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    data = model_zip.read_bytes()
    _FakeZenodo.archive = data
    _FakeZenodo.record = {
        "doi": "10.5281/zenodo.15911797",
        "metadata": {"title": "CL model", "version": "1.0", "license": {"id": "cc-by-4.0"}},
        "files": [
            {"key": "README.md", "size": 3, "checksum": "md5:0",
             "links": {"self": f"{base}/files/README.md"}},
            {"key": "cl_model.zip", "size": len(data), "checksum": f"md5:{hashlib.md5(data).hexdigest()}",
             "links": {"self": f"{base}/files/cl_model.zip/content"}},
        ],
    }
    monkeypatch.setenv("BIDS_CL_ZENODO_API", f"{base}/api")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield _FakeZenodo
    finally:
        server.shutdown()
        server.server_close()


def test_install_from_zenodo_verify_and_tamper(zenodo: type[_FakeZenodo], home: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    name = registry.PUBLISHED_MODEL
    assert cli.main(["install", name, "--no-progress"]) == 0
    folder = home / "models" / name
    lock = json.loads((folder / LOCK_NAME).read_text())
    assert lock["source"]["doi"] == "10.5281/zenodo.15911797" and lock["source"]["license"] == "cc-by-4.0"
    assert lock["source"]["archive"] == "cl_model.zip"
    model = load_model(name)
    prov = model.provenance
    assert prov["trust"] == "lock" and prov["doi"] == "10.5281/zenodo.15911797"
    assert prov["license"] == "cc-by-4.0" and prov["version"] == "1.0"
    assert cli.main(["install", name, "--no-progress"]) == 73  # already there
    assert cli.main(["verify"]) == 0
    capsys.readouterr()
    assert cli.main(["info", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["doi"] == prov["doi"]

    ckpt = next(folder.rglob("checkpoint_final.pth"))
    with open(ckpt, "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(BidsClError) as err:
        load_model(name)
    assert err.value.code == 65 and "lock" in str(err.value)
    assert cli.main(["verify", name]) == 65
    assert "changed file" in capsys.readouterr().out


def test_install_checksum_mismatch_and_choice(zenodo: type[_FakeZenodo], home: Path) -> None:
    zenodo.record["files"][1]["checksum"] = "md5:" + "0" * 32
    assert cli.main(["install", registry.PUBLISHED_MODEL, "--no-progress"]) == 65
    assert not (home / "models" / registry.PUBLISHED_MODEL).exists()
    zenodo.record["files"][0]["key"] = "other.zip"
    with pytest.raises(BidsClError) as err:
        store.install_from_zenodo(registry.PUBLISHED_MODEL, progress=False)
    assert "several zip files" in str(err.value)


def test_install_from_file_and_list(model_zip: Path, home: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install", registry.PUBLISHED_MODEL, "--from-file", str(model_zip)]) == 0
    assert cli.main(["install", "mymodel", "--from-file", str(model_zip)]) == 0
    assert load_model("mymodel").provenance["trust"] == "unverified source"  # a zip without a lock
    capsys.readouterr()
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mymodel" in out and "demo" in out and "10.5281/zenodo.15911797" in out
    assert cli.main(["info", "mymodel"]) == 0
    assert "fold_0/checkpoint_final.pth" in capsys.readouterr().out
    evil = tmp_path / "evil.zip"
    import zipfile

    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", "x")
    assert cli.main(["install", "evil", "--from-file", str(evil)]) == 65
    assert not (home.parent / "escape.txt").exists()
    assert cli.main(["install", "x", "--from-file", str(tmp_path / "missing.zip")]) == 66


def test_unknown_trainer_falls_back_and_trainer_module(model_dir: Path, tmp_path: Path) -> None:
    import torch

    custom = tmp_path / "custom"
    shutil.copytree(model_dir, custom)
    for ckpt in custom.glob("fold_*/checkpoint_final.pth"):
        data = torch.load(ckpt, weights_only=False)
        data["trainer_name"] = "nnUNetTrainerBidsClTestOnly"
        torch.save(data, ckpt)
    model = load_model(custom)
    cls, warning = model.trainer_class()
    assert cls.__name__ == "nnUNetTrainer" and "not available" in warning

    trainers = custom / "trainers"
    trainers.mkdir()
    (trainers / "bids_cl_test_trainer.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class nnUNetTrainerBidsClTestOnly(nnUNetTrainer):\n    pass\n")
    settings = json.loads((custom / "bids_cl_model.json").read_text())
    settings["trainer_module"] = "trainers"
    (custom / "bids_cl_model.json").write_text(json.dumps(settings))
    cls, warning = load_model(custom).trainer_class()
    assert cls.__name__ == "nnUNetTrainerBidsClTestOnly" and warning is None


# ---------------------------------------------------------------- checkpoint trust (issue 18)

class _Payload:
    """Unpickling this creates ``marker``: a stand-in for code run from a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 (pickle protocol)
        return (open, (str(self.marker), "w"))


def _with_logging(model_dir: Path, dest: Path, value: object) -> Path:
    """A copy of ``model_dir`` whose fold_0 checkpoint carries ``value`` in its ``logging`` entry."""
    import torch

    shutil.copytree(model_dir, dest)
    ckpt = dest / "fold_0" / "checkpoint_final.pth"
    data = torch.load(ckpt, weights_only=True)
    data["logging"] = {"train_losses": [value]}
    torch.save(data, ckpt)
    return dest


def test_crafted_checkpoint_is_refused_in_a_folder_a_zip_and_an_install(
        model_dir: Path, home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    evil = _with_logging(model_dir, tmp_path / "evil", _Payload(marker))
    evil_zip = T.export_zip(evil, tmp_path / "evil.zip")
    for given in (evil, evil_zip):
        with pytest.raises(BidsClError) as err:
            load_model(given)
        assert err.value.code == 65 and "allow-list" in str(err.value) and "io.open" in str(err.value)
        assert not marker.exists()
    # the refused zip left nothing under _archives/ (no staging folder, no cache entry)
    assert not any((home / "models" / "_archives").iterdir())
    assert cli.main(["install", "evil", "--from-file", str(evil_zip)]) == 65
    assert not marker.exists() and not (home / "models" / "evil").exists()
    assert [p.name for p in (home / "models").iterdir()] == ["_archives"]


def test_a_lock_that_came_with_a_model_must_verify(model_dir: Path, home: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    shutil.copytree(model_dir, locked)
    write_lock_file(locked, source={"doi": "10.1/x"})
    good_zip = T.export_zip(locked, tmp_path / "good.zip")
    with open(locked / "fold_1" / "checkpoint_final.pth", "ab") as fh:
        fh.write(b"\0")
    bad_zip = T.export_zip(locked, tmp_path / "tampered.zip")

    assert cli.main(["install", "tampered", "--from-file", str(bad_zip)]) == 65
    assert "changed file" in capsys.readouterr().err
    assert not (home / "models" / "tampered").exists()
    with pytest.raises(BidsClError) as err:
        load_model(bad_zip)
    assert err.value.code == 65 and "lock" in str(err.value)
    assert not any((home / "models" / "_archives").iterdir())

    assert cli.main(["install", "good", "--from-file", str(good_zip)]) == 0
    prov = load_model("good").provenance
    assert prov["trust"] == "lock" and prov["source"]["origin"] == "lock in archive"
    assert load_model(good_zip).provenance["trust"] == "lock"
    assert cli.main(["verify", "good"]) == 0


def test_a_refused_zip_leaves_no_staging_folder(home: Path, tmp_path: Path) -> None:
    import zipfile

    for name, member in (("slip.zip", "../../escape.txt"), ("empty.zip", "README.txt")):
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr(member, "x")
        with pytest.raises(BidsClError) as err:
            load_model(tmp_path / name)
        assert err.value.code == 65
    assert not any((home / "models" / "_archives").iterdir())


def test_full_unpickling_only_for_one_model_installed_with_the_loud_option(
        model_dir: Path, home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fractions import Fraction

    odd = _with_logging(model_dir, tmp_path / "odd", Fraction(1, 3))  # harmless, but not allow-listed
    odd_zip = T.export_zip(odd, tmp_path / "odd.zip")
    with pytest.raises(BidsClError) as err:
        load_model(odd)
    assert err.value.code == 65 and "fractions.Fraction" in str(err.value)
    assert cli.main(["install", "odd", "--from-file", str(odd_zip)]) == 65
    # A lock inside the files cannot grant the permission: only the install option can.
    write_lock_file(odd, source={"unsafe_unpickling": True})
    with pytest.raises(BidsClError):
        load_model(odd)
    assert cli.main(["install", "odd", "--from-file", str(odd_zip), "--allow-unsafe-unpickling"]) == 0
    model = load_model("odd")
    assert model.checkpoint(0)["logging"]["train_losses"] == [Fraction(1, 3)]
    assert "UNSAFE" in caplog.text
    assert cli.main(["install", "other", "--from-file", str(odd_zip)]) == 65  # the permission is per model


def test_allow_list_reads_numpy_scalars_and_the_shipped_checkpoints_need_none(
        model_dir: Path, tmp_path: Path) -> None:
    import torch

    from bids_cl.engine.checkpoints import load_checkpoint
    from bids_cl.engine.registry import packaged_model_dir

    nnunet_like = _with_logging(model_dir, tmp_path / "np", np.float32(0.25))  # as nnU-Net logs losses
    ckpt = nnunet_like / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(ckpt, weights_only=True)
    assert load_checkpoint(ckpt)["logging"]["train_losses"] == [np.float32(0.25)]
    # a checkpoint written under numpy 1 names the scalar constructor numpy.core.multiarray.scalar
    import zipfile

    legacy = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(ckpt) as src, zipfile.ZipFile(legacy, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            dst.writestr(info, data)
    assert load_checkpoint(legacy)["logging"]["train_losses"] == [np.float32(0.25)]
    assert load_model(nnunet_like).provenance["trust"] == "unverified source"
    # the demo model was re-saved with plain Python numbers: torch's own safe loader suffices
    demo = torch.load(packaged_model_dir("demo") / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert demo["trainer_name"] == "nnUNetTrainer" and isinstance(demo["_best_ema"], float)
    assert load_model("demo").provenance["trust"] == "lock"


def test_engine_modules_import_each_other_without_cycles() -> None:
    """models <-> registry imported each other (a late import marked it): the store split removes it."""
    import ast

    package = Path(__file__).resolve().parents[1] / "bids_cl"
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bids_cl"):
                for alias in node.names:
                    sub = package.parent.joinpath(*f"{node.module}.{alias.name}".split("."))
                    is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                    deps.add(f"{node.module}.{alias.name}" if is_module else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("bids_cl"))
        graph[module] = deps - {module}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return trail + [start]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, trail + [dep]))
        return None

    engine = [m for m in graph if m.startswith("bids_cl.engine.")]
    assert {"bids_cl.engine.store", "bids_cl.engine.store_layout", "bids_cl.engine.models"} <= set(engine)
    assert [c for c in map(cycle_from, engine) if c] == []


def test_one_device_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bids_cl.engine import device, segmentation
    from bids_cl.preproc import skullstrip
    from bids_cl.train import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve_device("auto") == torch.device("cpu")
    assert run.resolve_device("auto", 1) == torch.device("cpu")
    for bad, code in (("cuda", 66), ("cuda:1", 66), ("gpu0", 64)):
        with pytest.raises(BidsClError) as err:
            device.resolve_device(bad)
        assert err.value.code == code
    with pytest.raises(BidsClError) as err:
        run.resolve_device("cuda", 1)  # training follows the same rule (it said 64 before)
    assert err.value.code == 66
    assert segmentation.resolve_device is device.resolve_device is skullstrip.resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.resolve_device("auto") == torch.device("cuda")


def test_cpu_warning_names_no_missing_option(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bids_cl.engine import CLSegmenter

    CLSegmenter(model_dir, device="cpu", nthreads=1)
    text = " ".join(r.getMessage() for r in caplog.records if "CPU" in r.getMessage())
    assert "without test-time mirroring" in text and "--tta" not in text and "tta=True" in text


def test_cuda_check_does_not_poison_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device auto`` asks NVML, never the CUDA runtime: the runtime's check initialises CUDA in the
    runner, and the MultiProc workers and the segmentation worker forked from it afterwards could not use
    the GPU ("Cannot re-initialize CUDA in forked subprocess")."""
    import torch

    from bids_cl.engine import device

    def runtime_check() -> int:
        raise AssertionError("the CUDA runtime was asked: a process forked now could not use the GPU")

    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "_initialized", False)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 1)  # NVML sees one GPU
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", runtime_check, raising=False)
    assert device.resolve_device("auto") == torch.device("cuda")
    assert device.resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 0)
    assert device.resolve_device("auto") == torch.device("cpu")
