"""Connected components of 3-D masks and the overlaps of two labellings (numpy/scipy only).

The one copy of these rules: the engine's post-processing and lesion table, the evaluation's
lesion matching, the report's lesion figures and the tune step all label, measure and compare
lesions with these functions. The module imports nothing of bids_cl but its error codes, and no
torch, so any layer may use it.

* connectivity: 6 (faces), 18 (faces + edges) or 26 (faces + edges + corners) neighbours; any other
  value is a usage error (``BidsClError``, exit 64);
* labels: int32, 1..N in C raster order of each component's first voxel (as scipy numbers them),
  0 = background;
* per-label arrays: index i holds label i + 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bids_cl.errors import EXIT_USAGE, BidsClError

CONNECTIVITIES: tuple[int, ...] = (6, 18, 26)
DEFAULT_CONNECTIVITY = 26
_SCIPY_RANK = {6: 1, 18: 2, 26: 3}  # neighbours -> scipy's structuring-element connectivity


def structuring_element(connectivity: int) -> np.ndarray:
    """The 3×3×3 neighbourhood of 6-, 18- or 26-connectivity; BidsClError (exit 64) otherwise."""
    rank = None
    if not isinstance(connectivity, bool | np.bool_):
        try:
            rank = _SCIPY_RANK.get(connectivity)
        except TypeError:  # unhashable
            rank = None
    if rank is None:
        raise BidsClError(f"connectivity must be 6, 18 or 26, not {connectivity!r}", EXIT_USAGE)
    return ndimage.generate_binary_structure(3, rank)


def foreground_bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box (slices) holding every non-zero voxel of an array; None when it is empty."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def label_components(
    mask: np.ndarray, connectivity: int = DEFAULT_CONNECTIVITY
) -> tuple[np.ndarray, int]:
    """Connected components of a 3-D mask (non-zero = foreground): (int32 labels 0..n, n).

    Labelling runs on the foreground bounding box only; cropping keeps the raster order, so the
    numbering is the one scipy gives on the whole volume.
    """
    element = structuring_element(connectivity)
    if np.ndim(mask) != 3:
        raise ValueError(f"expected a 3-D mask, got shape {np.shape(mask)}")
    # C order: scipy labels a Fortran-ordered array 2x slower (same numbering either way).
    foreground = np.ascontiguousarray(np.asarray(mask) > 0)
    labels = np.zeros(foreground.shape, dtype=np.int32)
    box = foreground_bbox(foreground)
    if box is None:
        return labels, 0
    cropped, n = ndimage.label(foreground[box], structure=element, output=np.int32)
    labels[box] = cropped
    return labels, int(n)


def label_sizes(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Voxel count of each label 1..n_labels (int64)."""
    values = labels[labels > 0]  # only foreground voxels: far cheaper than a whole-volume bincount
    return np.bincount(values, minlength=n_labels + 1)[1 : n_labels + 1].astype(np.int64)


def label_maxima(values: np.ndarray, labels: np.ndarray, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Maximum of ``values`` over each label in ``ids`` (float64; ``ndimage.maximum``'s result).

    Computed on the foreground voxels only: ``ndimage.maximum`` on the whole volume argsorts every voxel
    (3.7 s of a 0.5 mm image's 4 s lesion table; the foreground is a few thousand voxels). ``values`` and
    ``labels`` may be whole volumes or the foreground voxels already picked out (any same-shape arrays).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return np.zeros(0, dtype=np.float64)
    foreground = labels > 0
    return np.atleast_1d(np.asarray(ndimage.maximum(np.asarray(values)[foreground], labels[foreground],
                                                    index=ids), dtype=np.float64))


def label_centroids(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Mean voxel index (i, j, k) of each label 1..n_labels: array (n_labels, 3), NaN if absent."""
    coords = np.nonzero(labels)
    ids = labels[coords]
    counts = np.bincount(ids, minlength=n_labels + 1)[1 : n_labels + 1].astype(float)
    out = np.full((n_labels, 3), np.nan)
    present = counts > 0
    for axis, coord in enumerate(coords):
        sums = np.bincount(ids, weights=coord, minlength=n_labels + 1)[1 : n_labels + 1]
        out[present, axis] = sums[present] / counts[present]
    return out


def label_bboxes(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Bounding box of each label 1..n_labels: (n_labels, 6) int64 ``i0, j0, k0, i1, j1, k1``.

    Starts are inclusive, ends exclusive; an absent label gets -1 everywhere.
    """
    out = np.full((n_labels, 6), -1, dtype=np.int64)
    for i, box in enumerate(ndimage.find_objects(labels, max_label=n_labels)):
        if box is not None:
            out[i] = [s.start for s in box] + [s.stop for s in box]
    return out


def flat_views(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-D views of two same-shape arrays with matching element order (copies only if needed).

    Any order serves voxel-wise counting as long as both arrays use the same one; Fortran-ordered
    pairs (as loaded from NIfTI) are flattened in memory order instead of being copied.
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.flags.f_contiguous and b.flags.f_contiguous and not a.flags.c_contiguous:
        return a.ravel(order="F"), b.ravel(order="F")
    return a.reshape(-1), b.reshape(-1)


@dataclass(frozen=True)
class OverlapPairs:
    """Voxel counts of every (a id, b id) pair that shares at least one voxel (ids ≥ 1)."""

    a_id: np.ndarray  # int64
    b_id: np.ndarray  # int64
    voxels: np.ndarray  # int64, ≥ 1

    def __len__(self) -> int:
        return int(self.a_id.size)


def overlap_pairs(a_labels: np.ndarray, b_labels: np.ndarray) -> OverlapPairs:
    """Count overlapping voxels per pair of labels of two same-shape label images (ids ≤ 0 ignored).

    Only voxels labelled in both images are visited after one vectorised pass; each (a, b) pair is
    encoded as one int64 key so that np.unique counts all pairs at once.
    """
    a_flat, b_flat = flat_views(np.asarray(a_labels), np.asarray(b_labels))
    both = np.flatnonzero((a_flat > 0) & (b_flat > 0))
    if both.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return OverlapPairs(empty, empty.copy(), empty.copy())
    a = a_flat[both].astype(np.int64)
    b = b_flat[both].astype(np.int64)
    base = int(b.max()) + 1
    keys, counts = np.unique(a * base + b, return_counts=True)
    return OverlapPairs(keys // base, keys % base, counts.astype(np.int64))


def best_iou(
    pairs: OverlapPairs, a_voxels: np.ndarray, b_voxels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Best plain IoU |a∩b| / |a∪b| of each a label with any single b label, and of each b label.

    ``a_voxels`` / ``b_voxels``: the label sizes (`label_sizes`). 0 for a label overlapping none.
    """
    best_a = np.zeros(np.size(a_voxels))
    best_b = np.zeros(np.size(b_voxels))
    if len(pairs):
        union = a_voxels[pairs.a_id - 1] + b_voxels[pairs.b_id - 1] - pairs.voxels
        iou = pairs.voxels / union
        np.maximum.at(best_a, pairs.a_id - 1, iou)
        np.maximum.at(best_b, pairs.b_id - 1, iou)
    return best_a, best_b
