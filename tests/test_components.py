"""The shared connected-component rules (bids_cl.utils.components) and their users' connectivity."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bids_cl.errors import BidsClError
from bids_cl.evaluation.metrics import lesionwise_metrics
from bids_cl.utils.components import (
    CONNECTIVITIES,
    best_iou,
    label_bboxes,
    label_centroids,
    label_components,
    label_sizes,
    overlap_pairs,
    structuring_element,
)

# Pairs of voxels that touch only at a corner (26-neighbours), along an edge (18 and 26) or at
# a face (all connectivities).
NEIGHBOUR_PAIRS = {"corner": [(1, 1, 1), (2, 2, 2)], "edge": [(5, 5, 5), (6, 6, 5)],
                   "face": [(9, 9, 9), (10, 9, 9)]}


def _neighbour_pairs() -> np.ndarray:
    mask = np.zeros((12, 12, 12), bool)
    for voxels in NEIGHBOUR_PAIRS.values():
        mask[tuple(np.array(voxels).T)] = True
    return mask


@pytest.mark.parametrize(("connectivity", "expected"), [(6, 5), (18, 4), (26, 3)])
def test_connectivity_variants(connectivity: int, expected: int) -> None:
    # 6: five components (only the face pair joins); 18: the edge pair joins too; 26: all three.
    labels, n = label_components(_neighbour_pairs(), connectivity)
    assert n == expected and labels.dtype == np.int32 and labels.max() == expected
    # 6 / 18 / 26 neighbours of the centre voxel in the 3×3×3 element (plus the centre itself).
    assert int(structuring_element(connectivity).sum()) == connectivity + 1


@pytest.mark.parametrize("bad", [8, 0, 27, True, "26", None, [26], 2.5])
def test_invalid_connectivity_is_a_usage_error(bad: object) -> None:
    with pytest.raises(BidsClError) as err:
        structuring_element(bad)  # type: ignore[arg-type]
    assert err.value.code == 64
    with pytest.raises(BidsClError):
        label_components(_neighbour_pairs(), bad)  # type: ignore[arg-type]


def test_every_user_rejects_an_invalid_connectivity_alike() -> None:
    # Before one copy existed, evaluation raised ValueError and the report figures silently
    # used 26; now both stop with the usage error.
    from bids_cl.reports.figures import lesion_crops

    mask = _neighbour_pairs()
    with pytest.raises(BidsClError) as from_metrics:
        lesionwise_metrics(mask, mask, connectivity=8)
    image = nib.Nifti1Image(mask.astype(np.uint8), np.eye(4))
    table = pd.DataFrame({"lesion_id": [1], "volume_ul": [2.0], "centroid_i": [1.0],
                          "centroid_j": [1.0], "centroid_k": [1.0]})
    with pytest.raises(BidsClError) as from_figures:
        lesion_crops(image, image, table, connectivity=8)
    assert from_metrics.value.code == from_figures.value.code == 64


@pytest.mark.parametrize("seed", [0, 1])
def test_labelling_numbers_as_scipy_on_the_whole_volume(seed: int) -> None:
    # Labelling runs on the foreground box; ids must be scipy's whole-volume raster order anyway.
    rng = np.random.default_rng(seed)
    mask = np.zeros((14, 15, 16), bool)
    mask[3:11, 2:13, 4:12] = rng.random((8, 11, 8)) < 0.08
    for connectivity, rank in zip(CONNECTIVITIES, (1, 2, 3), strict=True):
        labels, n = label_components(np.asfortranarray(mask), connectivity)
        expected, n_expected = ndimage.label(mask, ndimage.generate_binary_structure(3, rank))
        assert n == n_expected > 10
        np.testing.assert_array_equal(labels, expected)


def test_empty_and_non_3d_masks() -> None:
    labels, n = label_components(np.zeros((4, 5, 6)))
    assert n == 0 and labels.shape == (4, 5, 6) and not labels.any()
    with pytest.raises(ValueError):
        label_components(np.ones((4, 5)))


def test_sizes_centroids_and_boxes() -> None:
    labels = np.zeros((8, 8, 8), np.int32)
    labels[1:3, 1, 1] = 1            # 2 voxels: centroid (1.5, 1, 1), box [1, 3) x [1, 2) x [1, 2)
    labels[5, 4:7, 2:4] = 2          # 3 x 2 = 6 voxels: centroid (5, 5, 2.5)
    # Label 3 is absent (n_labels = 3): size 0, centroid NaN, box -1.
    assert label_sizes(labels, 3).tolist() == [2, 6, 0]
    centroids = label_centroids(labels, 3)
    np.testing.assert_array_equal(centroids[:2], [[1.5, 1.0, 1.0], [5.0, 5.0, 2.5]])
    assert np.isnan(centroids[2]).all()
    assert label_bboxes(labels, 3).tolist() == [
        [1, 1, 1, 3, 2, 2], [5, 4, 2, 6, 7, 4], [-1, -1, -1, -1, -1, -1]]


def test_overlap_pairs_and_best_iou() -> None:
    a = np.zeros((1, 1, 10), np.int32)
    b = np.zeros_like(a)
    a[0, 0] = [1, 1, 1, 1, 0, 2, 2, 0, 3, 0]
    b[0, 0] = [4, 4, 0, 1, 1, 1, 0, 0, 0, 2]
    pairs = overlap_pairs(a, b)
    # Shared voxels: (1, 4) x2, (1, 1) x1, (2, 1) x1.
    assert list(zip(pairs.a_id.tolist(), pairs.b_id.tolist(), pairs.voxels.tolist(),
                    strict=True)) == [(1, 1, 1), (1, 4, 2), (2, 1, 1)]
    sizes_a, sizes_b = label_sizes(a, 3), label_sizes(b, 4)  # [4, 2, 1], [3, 1, 0, 2]
    best_a, best_b = best_iou(pairs, sizes_a, sizes_b)
    # a1: with b4 2 / (4 + 2 - 2) = 0.5, with b1 1 / (4 + 3 - 1) = 1/6 -> 0.5;
    # a2: with b1 1 / (2 + 3 - 1) = 0.25; a3: no overlap -> 0.
    np.testing.assert_allclose(best_a, [0.5, 0.25, 0.0])
    # b1: max(1/6, 0.25) = 0.25; b2: no overlap; b3: absent; b4: 0.5.
    np.testing.assert_allclose(best_b, [0.25, 0.0, 0.0, 0.5])


def test_module_imports_no_torch() -> None:
    # The shared rules must stay importable where torch is absent (evaluation, reports).
    code = ("import sys, bids_cl.utils.components, bids_cl.evaluation.metrics, "
            "bids_cl.engine.postproc; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.strip() == "False"


def test_label_maxima_equals_scipy_on_the_whole_volume() -> None:
    """The foreground-only maximum (no whole-volume argsort) gives ndimage.maximum's values exactly,
    also for a label that is absent and for a subset of ids in any order."""
    from bids_cl.utils.components import label_maxima

    rng = np.random.default_rng(4)
    values = rng.random((30, 32, 28)).astype(np.float32)
    labels, n = label_components(rng.random((30, 32, 28)) > 0.93, 26)
    assert n > 10
    ids = np.arange(1, n + 1)
    np.testing.assert_array_equal(label_maxima(values, labels, ids),
                                  np.asarray(ndimage.maximum(values, labels, index=ids), dtype=np.float64))
    subset = [n, 3, 1]
    np.testing.assert_array_equal(label_maxima(values, labels, subset),
                                  ndimage.maximum(values, labels, index=subset))
    assert label_maxima(values, labels, []).shape == (0,)
