"""The engine's own export (``predictor.lesion_probability``, the path that stays on the GPU) against
nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` on the same logits.

Runs on the CPU here; on CUDA the same torch code runs on the device (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bids_cl.engine import CLSegmenter
from bids_cl.engine import orientation as orient
from bids_cl.engine import predictor as pred
from bids_cl.engine import testing as T


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> CLSegmenter:
    plans, dj = T.tiny_plans(), T.tiny_dataset_json()  # 1 mm isotropic model
    model = T.write_model_folder(tmp_path_factory.mktemp("export") / "model", plans, dj, {
        0: T.random_weights(plans, dj, seed=2, bg_bias=0.5)})
    return CLSegmenter(model, device="cpu", nthreads=1)


def _logits_and_props(segmenter: CLSegmenter, shape: tuple[int, ...], zooms: tuple[float, ...],
                      seed: int = 0) -> tuple[torch.Tensor, dict]:
    """nnU-Net's preprocessing of a phantom, then random logits on the preprocessed grid (every voxel
    near the decision boundary somewhere, so rounding differences would show)."""
    affine = T.centred_affine(shape, zooms)
    img = T.phantom(shape, affine, brain_radii=tuple(0.35 * s * z for s, z in zip(shape, zooms, strict=True)))
    array = orient.to_nnunet_array(img.get_fdata(dtype=np.float32))
    data, _seg, props = pred.preprocess(segmenter.predictor, array, orient.nnunet_spacing(zooms))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn((2, *data.shape[1:]), generator=gen) * 3.0
    return logits, props


def _stock(segmenter: CLSegmenter, logits: torch.Tensor, props: dict) -> np.ndarray:
    return pred.export_probabilities(segmenter.predictor, logits, props, 1)


def test_same_grid_is_nnunets_export(segmenter: CLSegmenter) -> None:
    """No resampling: the same softmax of the same logits; only the softmax kernel's vectorisation may
    round the last bit differently (observed: 1 voxel in 63 360, by 2e-9)."""
    logits, props = _logits_and_props(segmenter, (40, 44, 36), (1.0, 1.0, 1.0))
    assert pred.export_resampling(segmenter.predictor, props, tuple(logits.shape)) == "none"
    ours = pred.lesion_probability(segmenter.predictor, logits, props, 1)
    stock = _stock(segmenter, logits, props)
    assert ours.dtype == np.float32 and ours.shape == stock.shape
    assert float(np.abs(ours - stock).max()) <= 1e-7
    np.testing.assert_array_equal(ours > 0.5, stock > 0.5)
    # The crop was real: outside nnU-Net's box the lesion probability is exactly 0, as in its export.
    assert tuple(props["shape_before_cropping"]) != tuple(props["shape_after_cropping_and_before_resampling"])
    assert (ours == 0).any() and (ours > 0).any()


@pytest.mark.parametrize("zooms", [(0.75, 0.75, 0.75), (1.3, 1.2, 1.1)])
def test_linear_resampling_matches_nnunets_float64_export(segmenter: CLSegmenter, zooms) -> None:
    """7T-like finer and coarser grids: nnU-Net resamples back with skimage order 1 in float64; ours is
    trilinear in float32 (same coordinates, same edge rule)."""
    logits, props = _logits_and_props(segmenter, (36, 40, 32), zooms, seed=1)
    target = tuple(props["shape_after_cropping_and_before_resampling"])
    assert tuple(logits.shape[1:]) != target  # the resampling path is taken
    assert pred.export_resampling(segmenter.predictor, props, tuple(logits.shape)) == "linear"
    ours = pred.lesion_probability(segmenter.predictor, logits, props, 1)
    stock = _stock(segmenter, logits, props)
    assert ours.shape == stock.shape
    assert float(np.abs(ours - stock).max()) < 1e-5
    assert int(((ours > 0.5) != (stock > 0.5)).sum()) <= 2  # ties at 0.5 only


def test_wrong_coordinates_would_be_caught(segmenter: CLSegmenter) -> None:
    """The bound above is tight enough to fail with the other trilinear convention (corner-aligned)."""
    logits, props = _logits_and_props(segmenter, (36, 40, 32), (0.75, 0.75, 0.75), seed=1)
    target = tuple(props["shape_after_cropping_and_before_resampling"])
    corner = torch.nn.functional.interpolate(logits[None], size=target, mode="trilinear",
                                             align_corners=True)[0]
    lesion = torch.softmax(corner, 0)[1].numpy()
    stock = _stock(segmenter, logits, props)
    box = tuple(slice(lo, hi) for lo, hi in props["bbox_used_for_cropping"])
    cropped = stock.transpose(segmenter.predictor.plans_manager.transpose_forward)[box]
    assert float(np.abs(lesion - cropped).max()) > 1e-3


def test_separate_z_falls_back_to_nnunets_export(segmenter: CLSegmenter) -> None:
    """Thick slices (anisotropy > 3): nnU-Net resamples in-plane then nearest along z; its own export runs."""
    logits, props = _logits_and_props(segmenter, (40, 40, 10), (1.0, 1.0, 4.0), seed=2)
    assert pred.export_resampling(segmenter.predictor, props, tuple(logits.shape)) == "other"
    np.testing.assert_array_equal(pred.lesion_probability(segmenter.predictor, logits, props, 1),
                                  _stock(segmenter, logits, props))


def test_mean_logits_is_nnunets_running_sum() -> None:
    gen = torch.Generator().manual_seed(3)
    folds = [torch.randn((2, 5, 6, 7), generator=gen) for _ in range(5)]
    total = torch.zeros_like(folds[0])
    for f in folds:
        total += f
    torch.testing.assert_close(pred.mean_logits(folds), total / 5, rtol=0, atol=0)
    assert pred.mean_logits(folds[:1]) is folds[0]
    before = folds[0].clone()
    pred.mean_logits(folds)
    torch.testing.assert_close(folds[0], before, rtol=0, atol=0)  # the fold's own logits are untouched


def test_segmenter_output_unchanged_by_the_export_path(segmenter: CLSegmenter, tmp_path: Path) -> None:
    """End to end on a 0.8 mm image (resampling path): the segmenter's probability equals nnU-Net's
    export of the same logits within float32 rounding."""
    shape, zooms = (44, 48, 40), (0.8, 0.8, 0.8)
    affine = T.centred_affine(shape, zooms)
    img = T.phantom(shape, affine, brain_radii=(12, 14, 11), blobs=[((0, 0, 0), 2.5)])
    result = segmenter.segment(img)
    array = orient.to_nnunet_array(img.get_fdata(dtype=np.float32))
    data, seg, props = pred.preprocess(segmenter.predictor, array, orient.nnunet_spacing(zooms))
    segmenter.predictor.tile_mask = torch.from_numpy(seg[0] >= 0)
    logits = pred.fold_logits(segmenter.predictor, segmenter.parameters, data)
    assert all(lg.device.type == "cpu" for lg in logits)
    stock = orient.from_nnunet_array(_stock(segmenter, pred.mean_logits(logits), props))
    ours = np.asarray(result.probability.dataobj)
    brain = ours > 0
    assert brain.any()
    assert float(np.abs(ours - stock)[brain].max()) < 1e-5


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (benchmarks/gpu_check.sh)")


@needs_cuda
@pytest.mark.parametrize("zooms", [(1.0, 1.0, 1.0), (0.75, 0.75, 0.75)])
def test_export_on_the_gpu_equals_the_cpu(segmenter: CLSegmenter, zooms) -> None:
    """The same torch export with the logits on the GPU: the map that comes back equals the CPU's."""
    logits, props = _logits_and_props(segmenter, (40, 44, 36), zooms, seed=4)
    on_cpu = pred.lesion_probability(segmenter.predictor, logits, props, 1)
    on_gpu = pred.lesion_probability(segmenter.predictor, logits.to("cuda"), props, 1)
    assert float(np.abs(on_gpu - on_cpu).max()) < 1e-5


@needs_cuda
def test_gpu_segmenter_keeps_fold_logits_on_the_device_and_agrees_with_stock(tmp_path: Path) -> None:
    """A 2-fold model on CUDA: fold logits stay on the device, and the final mask agrees with stock
    nnU-Net on the GPU (fp16 autocast in both) in all but 1e-4 of the voxels."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    plans, dj = T.tiny_plans(), T.tiny_dataset_json()
    model = T.write_model_folder(tmp_path / "model", plans, dj, {
        0: T.random_weights(plans, dj, seed=5, bg_bias=1.0),
        1: T.random_weights(plans, dj, seed=6, bg_bias=1.0)})
    shape, zooms = (70, 52, 50), (1.0, 1.0, 1.0)
    img = T.phantom(shape, T.centred_affine(shape, zooms), brain_radii=(25, 20, 18), blobs=[((0, 0, 0), 2.0)])
    gpu = CLSegmenter(model, device="cuda", nthreads=2)
    array = orient.to_nnunet_array(img.get_fdata(dtype=np.float32))
    data, _seg, _props = pred.preprocess(gpu.predictor, array, orient.nnunet_spacing(zooms))
    assert all(lg.device.type == "cuda" for lg in pred.fold_logits(gpu.predictor, gpu.parameters, data))
    ours = np.asarray(gpu.segment(img).probability.dataobj)
    with pred.quiet_stdout():
        stock = nnUNetPredictor(device=torch.device("cuda"), use_mirroring=True, allow_tqdm=False)
        stock.initialize_from_trained_model_folder(str(model), (0, 1))
        _s, probs = stock.predict_single_npy_array(array, {"spacing": orient.nnunet_spacing(zooms)}, None,
                                                   None, True)
    stock_p = orient.from_nnunet_array(probs[1])
    brain = np.asarray(img.dataobj) != 0
    stock_p = np.where(brain, stock_p, 0.0)
    assert float(np.mean((ours > 0.5) != (stock_p > 0.5))) <= 1e-4
