"""The fast sliding window (FastPredictor) against stock nnU-Net on the same model and input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_cl.engine import CLSegmenter, segment
from bids_cl.engine import orientation as orient
from bids_cl.engine import testing as T
from bids_cl.engine.predictor import mirror_combinations, quiet_stdout, tiles_with_foreground

# Final-mask disagreement allowed between the fast path and stock nnU-Net (fraction of voxels).
MAX_DISAGREEMENT = 1e-4
# Stock accumulates logits in float16; the fast path in float32: probabilities differ at that level.
MAX_PROB_DIFF = 5e-3


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    plans, dj = T.tiny_plans(), T.tiny_dataset_json()
    # bg_bias: mostly-confident background, like a trained lesion model (random nets hover near 0.5).
    return T.write_model_folder(tmp_path_factory.mktemp("fast") / "model", plans, dj, {
        0: T.random_weights(plans, dj, seed=5, bg_bias=1.0),
        1: T.random_weights(plans, dj, seed=6, bg_bias=1.0)})


def _two_brains(shape=(70, 52, 50)) -> nib.Nifti1Image:
    """Two small 'brains' in opposite corners: nnU-Net's crop keeps both, so many tiles are empty."""
    affine = T.centred_affine(shape)
    half = np.array(shape) / 2
    a = T.phantom(shape, affine, brain_centre=-(half - 10), brain_radii=(9, 9, 9),
                  blobs=[(-(half - 10), 2.0)])
    b = T.phantom(shape, affine, brain_centre=half - 10, brain_radii=(8, 8, 8), blobs=[(half - 10, 2.0)])
    return nib.Nifti1Image(np.asarray(a.dataobj) + np.asarray(b.dataobj), affine)


def _stock_probability(model: Path, img: nib.Nifti1Image, folds, tta: bool) -> np.ndarray:
    """Plain nnU-Net: initialize_from_trained_model_folder + predict_single_npy_array (RAS input)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with quiet_stdout():
        predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=tta, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model), folds)
        arr = orient.to_nnunet_array(img.get_fdata(dtype=np.float32))
        _seg, probs = predictor.predict_single_npy_array(
            arr, {"spacing": orient.nnunet_spacing(img.header.get_zooms())}, None, None, True)
    return orient.from_nnunet_array(probs[1])


def _compare(ours: np.ndarray, stock: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    stock = np.where(brain, stock, 0.0)  # bids_cl restricts lesions to the brain in every mode
    disagreement = float(np.mean((ours > 0.5) != (stock > 0.5)))
    return disagreement, float(np.abs(ours - stock)[brain].max())


def test_fast_path_matches_stock_and_skips_empty_tiles(model: Path) -> None:
    torch.set_num_threads(1)
    img = _two_brains()
    brain = np.asarray(img.dataobj) != 0
    stock = _stock_probability(model, img, (0, 1), tta=False)
    fast = segment(img, str(model), device="cpu", nthreads=2)  # two CPU tile workers
    assert fast.summary["TilesRun"] < fast.summary["TilesTotal"]  # empty tiles were skipped
    disagreement, diff = _compare(fast.probability.get_fdata(), stock, brain)
    assert disagreement <= MAX_DISAGREEMENT and diff < MAX_PROB_DIFF
    assert (stock[brain] > 0.5).any()  # the comparison is not vacuous
    # fast=False runs nnU-Net's own sliding window through the same engine code.
    slow = segment(img, str(model), device="cpu", nthreads=1, fast=False)
    disagreement, diff = _compare(slow.probability.get_fdata(), stock, brain)
    assert disagreement <= MAX_DISAGREEMENT and diff < MAX_PROB_DIFF
    # A single voxel at the threshold may split a component: counts agree up to that.
    assert abs(slow.summary["LesionCount"] - fast.summary["LesionCount"]) <= 2


def test_fast_tta_batched_matches_stock(model: Path) -> None:
    """Mirror variants batched (and several tiles per batch, as on a GPU) equal stock's loop."""
    torch.set_num_threads(1)
    shape = (36, 40, 34)
    img = T.phantom(shape, T.centred_affine(shape), brain_radii=(16, 18, 15), blobs=[((3, 2, 1), 2.0)])
    brain = np.asarray(img.dataobj) != 0
    stock = _stock_probability(model, img, (0,), tta=True)
    seg = CLSegmenter(str(model), device="cpu", folds=[0], tta=True, nthreads=1)
    seg.predictor.tile_batch_size = 3  # 8 mirrors in chunks of 3: uneven batches on purpose
    res = seg.segment(img)
    assert res.summary["TTA"] is True
    disagreement, diff = _compare(res.probability.get_fdata(), stock, brain)
    assert disagreement <= MAX_DISAGREEMENT and diff < MAX_PROB_DIFF


def test_tiles_with_foreground() -> None:
    mask = torch.zeros((8, 8, 8), dtype=torch.bool)
    mask[6, 6, 6] = True
    slicers = [(slice(None), slice(0, 4), slice(0, 4), slice(0, 4)),
               (slice(None), slice(4, 8), slice(4, 8), slice(4, 8)),
               (slice(None), slice(0, 8), slice(0, 8), slice(0, 7)),
               (slice(None), slice(0, 8), slice(0, 8), slice(0, 6))]
    assert tiles_with_foreground(mask, slicers) == [False, True, True, False]


def test_mirror_combinations() -> None:
    assert mirror_combinations(None) == [()]
    combos = mirror_combinations((0, 1, 2))
    assert len(combos) == 8 and combos[0] == () and (2, 3, 4) in combos


@pytest.mark.parametrize("channels_last", [False, True])
def test_matmul_head_equals_the_convolution(channels_last: bool) -> None:
    """The 1x1x1 head as a matrix product, in both memory formats (the CPU path runs channels-last)."""
    from bids_cl.engine.predictor import _MatmulHead

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(8, 3, 1)
    x = torch.randn(2, 8, 5, 6, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        torch.testing.assert_close(_MatmulHead(conv)(x), conv(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize(("mean", "std"), [(5.0, 3.0), (100.0, 0.01), (0.0, 1e-3)])
def test_channels_last_instance_norm_is_as_accurate_as_the_contiguous_kernel(mean: float, std: float,
                                                                              in_place: bool) -> None:
    """PyTorch's channels-last group norm reached 1.5e-3 error (and garbage for mean 100, std 0.01);
    bids_cl's stays at the contiguous kernel's level against a float64 reference."""
    from bids_cl.engine.predictor import channels_last_instance_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, 8, 40, 48, 56), generator=gen) * std + mean
    w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    ref = torch.nn.functional.group_norm(x.double(), 8, w.double(), b.double(), 1e-5)
    contiguous_err = (torch.nn.functional.group_norm(x, 8, w, b, 1e-5).double() - ref).abs().max().item()
    given = x.contiguous(memory_format=torch.channels_last_3d)
    ours = channels_last_instance_norm(given, w, b, 1e-5, in_place=in_place)
    assert ours.is_contiguous(memory_format=torch.channels_last_3d)
    assert (ours.data_ptr() == given.data_ptr()) is in_place
    assert (ours.double() - ref).abs().max().item() <= max(4 * contiguous_err, 1e-5)


def test_only_norms_fed_by_their_convolution_work_in_place() -> None:
    from bids_cl.engine.predictor import _InstanceNormAsGroupNorm, _swap_instance_norms

    net = T.build_network(T.tiny_plans(), T.tiny_dataset_json())
    loose = torch.nn.InstanceNorm3d(4, affine=True)
    holder = torch.nn.ModuleDict({"net": net, "loose": loose})
    _swap_instance_norms(holder)
    norms = [m for m in net.modules() if isinstance(m, _InstanceNormAsGroupNorm)]
    assert norms and all(m.in_place for m in norms)  # all inside ConvDropoutNormReLU
    assert isinstance(holder["loose"], _InstanceNormAsGroupNorm) and not holder["loose"].in_place


def test_cpu_tile_workers_fit_the_memory_budget(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers = threads up to 4, fewer where their tiles (all feature maps in fp32) exceed a quarter of
    the usable memory (at most 8 GB)."""
    from bids_cl.engine import predictor as pred
    from bids_cl.utils import resources

    seg = CLSegmenter(model, device="cpu", nthreads=16)
    fp = seg.predictor
    per_tile = pred._tile_memory_bytes(fp.network, tuple(fp.configuration_manager.patch_size))
    assert per_tile == int(fp.network.compute_conv_feature_map_size(
        tuple(fp.configuration_manager.patch_size))) * 4
    monkeypatch.setattr(resources, "effective_mem_mb", lambda *a, **k: 64_000)
    assert fp._cpu_workers(100) == (4, 4)  # tiny tiles: threads decide
    monkeypatch.setattr(pred, "_tile_memory_bytes", lambda net, patch: 1_840_000_000)  # a paper tile
    assert fp._cpu_workers(100) == (4, 4)  # 8 GB hold 4
    monkeypatch.setattr(resources, "effective_mem_mb", lambda *a, **k: 16_000)
    assert fp._cpu_workers(100) == (2, 8)  # 4 GB hold 2
    monkeypatch.setattr(resources, "effective_mem_mb", lambda *a, **k: 4_000)
    assert fp._cpu_workers(100) == (1, 16)  # never fewer than one
