"""Post-processing, lesion table, uncertainty and OOD rule: pure numpy, no network."""

from __future__ import annotations

import numpy as np
import pytest

from bids_cl.derivatives.records import SegmentationRecord
from bids_cl.engine.lesions import (
    LESION_COLUMNS,
    fold_uncertainty,
    intensity_ood,
    lesion_table,
    summarize,
    voxel_volume_ul,
)
from bids_cl.engine.postproc import (
    min_size_in_voxels,
    postprocess,
    remove_small_components,
    threshold_probability,
)
from bids_cl.errors import BidsClError
from bids_cl.utils.components import best_iou, label_sizes, overlap_pairs


def _diagonal_pair() -> np.ndarray:
    """Two voxels touching only at a corner, two touching only along an edge, one face pair."""
    mask = np.zeros((12, 12, 12), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True            # corner neighbours (26 only)
    mask[5, 5, 5] = mask[6, 6, 5] = True            # edge neighbours (18 and 26)
    mask[9, 9, 9] = mask[10, 9, 9] = True           # face neighbours (all)
    return mask


def test_postprocess_bad_connectivity_is_a_usage_error() -> None:
    with pytest.raises(BidsClError) as err:
        postprocess(_diagonal_pair().astype(np.float32), connectivity=8)
    assert err.value.code == 64


def test_threshold_is_strict() -> None:
    prob = np.array([0.49, 0.5, 0.51], np.float32)
    assert threshold_probability(prob, 0.5).tolist() == [False, False, True]


@pytest.mark.parametrize(("size", "voxel_ul", "expected"), [
    (None, 1.0, None), (3, 1.0, 3), ("3", 1.0, 3), ("5vox", 0.5, 5),
    ("3uL", 1.0, 3), ("3 µL", 0.125, 24), ("2.5uL", 1.0, 3), ("1mm3", 0.343, 3), ((3.0, "ul"), 1.5, 2),
    # 10 voxels of 0.7 mm as a volume, read back on a float32 header's slightly smaller voxels: still 10
    ((3.43, "ul"), float(np.float32(0.7)) ** 3, 10), ((80.0, "ul"), 7.999999999999998, 10),
    ((80.0, "ul"), 9.6, 9),
])
def test_min_size_units(size: object, voxel_ul: float, expected: int | None) -> None:
    assert min_size_in_voxels(size, voxel_ul) == expected


def test_min_size_rejects_garbage() -> None:
    with pytest.raises(BidsClError):
        min_size_in_voxels("three microlitres", 1.0)


def test_remove_small_components_keeps_order() -> None:
    labels = np.zeros((10, 10, 10), np.int32)
    labels[0, 0, 0] = 1                  # 1 voxel
    labels[3:5, 3:5, 3:5] = 2            # 8 voxels
    labels[7, 7, 7:9] = 3                # 2 voxels
    out, n = remove_small_components(labels, 3, 2)
    assert n == 2
    assert out[3, 3, 3] == 1 and out[7, 7, 7] == 2 and out[0, 0, 0] == 0


def test_postprocess_threshold_connectivity_minsize() -> None:
    prob = np.zeros((12, 12, 12), np.float32)
    prob[_diagonal_pair()] = 0.9
    prob[0, 11, 11] = 0.6
    labels, n = postprocess(prob, threshold=0.5, connectivity=26, min_voxels=2)
    assert n == 3 and labels.max() == 3
    labels, n = postprocess(prob, threshold=0.7, connectivity=6, min_voxels=None)
    assert n == 5


def test_best_iou_and_uncertainty() -> None:
    ens = np.zeros((10, 10, 10), np.int32)
    ens[1:3, 1:3, 1:3] = 1   # 8 voxels
    ens[6:8, 6:8, 6:8] = 2   # 8 voxels
    fold_a = (ens > 0).astype(np.int32)
    fold_a[6:8, 6:8, 6:8] = 2            # identical to the ensemble
    fold_b = np.zeros_like(ens)
    fold_b[1:3, 1:3, 1:2] = 1            # half of lesion 1 (IoU 0.5), nothing at lesion 2
    sizes = label_sizes(ens, 2)
    best_a, _ = best_iou(overlap_pairs(ens, fold_a), sizes, label_sizes(fold_a, 2))
    best_b, best_of_fold_b = best_iou(overlap_pairs(ens, fold_b), sizes, label_sizes(fold_b, 1))
    np.testing.assert_allclose(best_a, [1.0, 1.0])
    # lesion 1 (8 voxels) vs fold_b's 4 voxels inside it: IoU 4 / 8; lesion 2 overlaps nothing.
    np.testing.assert_allclose(best_b, [0.5, 0.0])
    np.testing.assert_allclose(best_of_fold_b, [0.5])
    unc = fold_uncertainty(ens, 2, [(fold_a, 2), (fold_b, 1)])
    np.testing.assert_allclose(unc, [0.25, 0.5])
    assert fold_uncertainty(ens, 2, [(fold_a, 2)]).tolist() == [0.0, 0.0]  # one fold: 0 by definition


def test_lesion_table_columns_and_values() -> None:
    affine = np.diag([2.0, 1.0, 0.5, 1.0])
    affine[:3, 3] = [-10, 20, 5]
    labels = np.zeros((10, 10, 10), np.int32)
    labels[2:4, 5, 5] = 1
    labels[7, 7, 7:10] = 2
    prob = np.where(labels > 0, 0.8, 0.1).astype(np.float32)
    prob[2, 5, 5] = 0.95
    table = lesion_table(labels, 2, prob, affine)
    assert list(table.columns) == LESION_COLUMNS
    row = table.iloc[0]
    assert row.lesion_id == 1 and row.voxels == 2 and row.volume_ul == pytest.approx(2.0)
    assert (row.centroid_i, row.centroid_j, row.centroid_k) == (2.5, 5.0, 5.0)
    assert (row.centroid_x, row.centroid_y, row.centroid_z) == (-5.0, 25.0, 7.5)
    assert (row.bbox_i0, row.bbox_i1, row.bbox_k0, row.bbox_k1) == (2, 4, 5, 6)  # end exclusive
    assert row.max_prob == pytest.approx(0.95) and row.mean_prob == pytest.approx(0.875)
    assert table.iloc[1].bbox_k1 == 10 and table.iloc[1].uncertainty == 0.0
    assert voxel_volume_ul(affine) == pytest.approx(1.0)
    empty = lesion_table(np.zeros((4, 4, 4), np.int32), 0, np.zeros((4, 4, 4)), np.eye(4))
    assert list(empty.columns) == LESION_COLUMNS and len(empty) == 0
    record = SegmentationRecord(
        threshold=0.5, threshold_source="default", connectivity=26, min_lesion_size="3uL",
        min_lesion_size_source="user", min_lesion_size_voxels=3, folds=[0], tta=False, device="cpu",
        fast_path=True, threads=1, precision="fp32", orientation={"input": "RAS", "model": "RAS"},
        tiles_run=1, tiles_total=1, ood_warning=None, warnings=[], provenance={"name": "x"}, timings={})
    summary = summarize(table, record)
    for key in ("LesionCount", "TotalVolume_uL", "MedianVolume_uL", "OODWarning", "Threshold",
                "Connectivity", "MinLesionSize", "Model"):
        assert key in summary
    assert summary["Threshold"] == 0.5 and summary["MinLesionSizeVoxels"] == 3
    assert summary["LesionCount"] == 2 and summary["TotalVolume_uL"] == pytest.approx(5.0)
    assert summary["MedianVolume_uL"] == pytest.approx(2.5)


FINGERPRINT = {"mean": 600.0, "median": 600.0, "std": 150.0, "min": 300.0, "max": 1000.0,
               "percentile_00_5": 310.0, "percentile_99_5": 980.0}


def test_ood_rule() -> None:
    rng = np.random.default_rng(0)
    brain = rng.normal(900, 150, 50_000).clip(1)
    assert intensity_ood(brain, FINGERPRINT) is None
    assert "median" in intensity_ood(brain / 1000.0, FINGERPRINT)          # rescaled 0-1 image
    assert "outside the training" in intensity_ood(brain * 4.0, FINGERPRINT)
    assert "negative" in intensity_ood(brain - 950, FINGERPRINT)
    assert "non-finite" in intensity_ood(np.array([1.0, np.nan]), FINGERPRINT)
    assert intensity_ood(brain, None) is None
