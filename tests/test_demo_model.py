"""The packaged demo model: small, locked, loadable by nnU-Net and bids_cl, and it finds phantom lesions.

Skipped only when the demo model folder is absent (it is package data, built by docs/demo-model.md).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cl.engine.registry import packaged_model_dir

DEMO = packaged_model_dir("demo")
pytestmark = pytest.mark.skipif(not (DEMO / "plans.json").is_file(), reason="demo model folder absent")


def test_demo_model_folder_is_small_and_complete() -> None:
    import json

    files = [p for p in DEMO.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    for name in ("dataset.json", "plans.json", "dataset_fingerprint.json", "bids_cl_model.json",
                 "fold_0/checkpoint_final.pth"):
        assert (DEMO / name).is_file(), name
    meta = json.loads((DEMO / "bids_cl_model.json").read_text())
    assert meta["name"] == "demo" and meta["orientation"] == "RAS"
    assert "phantom" in meta["warning"].lower()


def test_demo_model_lock_verifies() -> None:
    from bids_cl.engine.lockfile import read_lock_file, verify_lock_file

    assert read_lock_file(DEMO) is not None
    assert verify_lock_file(DEMO) == []


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bids_cl.synth.generate import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("demo") / "ph", participants=1, seed=7, size="tiny",
                            sequence="mp2rage", lesion_free_fraction=0.0)


def _brain_and_truth(root: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    from bids_cl.train.convert import find_cases

    case = find_cases(root, root / "derivatives" / "manual_masks")[0][0]
    img = nib.load(str(case.image))
    mask = np.asanyarray(nib.load(str(case.brain_mask)).dataobj) > 0
    brain = nib.Nifti1Image(np.where(mask, img.get_fdata(dtype=np.float32), 0).astype(np.float32), img.affine)
    return brain, np.asanyarray(nib.load(str(case.label)).dataobj) > 0


def _true_positives(pred: np.ndarray, truth: np.ndarray) -> int:
    from bids_cl.evaluation.metrics import evaluate_masks

    return int(evaluate_masks(pred, truth)["tp"])


def test_demo_model_segments_a_phantom_with_nnunet(phantom: Path) -> None:
    """nnU-Net alone (no bids_cl.train import at inference): RAS voxel order in, lesions out."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    brain, truth = _brain_and_truth(phantom)
    assert truth.any()
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(DEMO), use_folds=None)
    ras = nib.as_closest_canonical(brain)
    data = ras.get_fdata(dtype=np.float32).transpose(2, 1, 0)[None]
    seg = predictor.predict_single_npy_array(data, {"spacing": list(ras.header.get_zooms()[::-1])},
                                             None, None, False)
    pred_ras = nib.Nifti1Image(np.asarray(seg).transpose(2, 1, 0).astype(np.uint8), ras.affine)
    truth_ras = np.asanyarray(nib.as_closest_canonical(
        nib.Nifti1Image(truth.astype(np.uint8), brain.affine)).dataobj) > 0
    assert _true_positives(np.asanyarray(pred_ras.dataobj) > 0, truth_ras) >= 1


def test_demo_model_segments_a_phantom_with_the_engine(phantom: Path) -> None:
    engine = pytest.importorskip("bids_cl.engine")
    if not hasattr(engine, "segment") or not hasattr(engine, "load_model"):
        pytest.skip("bids_cl.engine has no segment/load_model yet")
    brain, truth = _brain_and_truth(phantom)
    model = engine.load_model("demo")  # by name: refused unless the lock verifies
    res = engine.segment(brain, model, device="cpu", tta=False, nthreads=1)
    assert _true_positives(np.asanyarray(res.mask.dataobj) > 0, truth) >= 1
