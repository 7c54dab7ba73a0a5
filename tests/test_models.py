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
