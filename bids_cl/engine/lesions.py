"""Per-lesion table, fold-disagreement uncertainty, per-image summary and the intensity OOD check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from bids_cl.derivatives.records import SegmentationRecord
from bids_cl.derivatives.spec import LESION_COLUMNS
from bids_cl.utils.components import (
    best_iou,
    label_bboxes,
    label_centroids,
    label_maxima,
    label_sizes,
    overlap_pairs,
)


def voxel_volume_ul(affine: np.ndarray) -> float:
    """Voxel volume in µL (= mm³) from the affine (exact for oblique and sheared grids too)."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


def fold_uncertainty(labels: np.ndarray, n: int,
                     fold_labels: Sequence[tuple[np.ndarray, int]] | None) -> np.ndarray:
    """1 - mean over folds of each lesion's best IoU with that fold's lesions (0 with fewer than 2 folds).

    The lesion-scale disagreement of the ensemble members (interpret-lesion-unc, ``uq/les_measures.py``):
    0 when every fold found exactly this lesion, 1 when no fold overlaps it.
    """
    if n == 0 or not fold_labels or len(fold_labels) < 2:
        return np.zeros(n, dtype=np.float64)
    sizes = label_sizes(labels, n)
    ious = np.stack([best_iou(overlap_pairs(labels, fold), sizes, label_sizes(fold, n_fold))[0]
                     for fold, n_fold in fold_labels])
    return 1.0 - ious.mean(axis=0)


def lesion_table(labels: np.ndarray, n: int, probability: np.ndarray, affine: np.ndarray,
                 fold_labels: Sequence[tuple[np.ndarray, int]] | None = None) -> pd.DataFrame:
    """One row per lesion (contract columns). Bounding boxes: start inclusive, end exclusive."""
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c.startswith(("lesion", "voxels", "bbox"))
                                          else "float64") for c in LESION_COLUMNS})
    counts = label_sizes(labels, n)
    centroid = label_centroids(labels, n)
    world = centroid @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    foreground = labels > 0
    fg_labels, fg_prob = labels[foreground], probability[foreground]  # one pass over the volume
    mean_prob = np.bincount(fg_labels, weights=fg_prob.astype(np.float64), minlength=n + 1)[1:] / counts
    max_prob = label_maxima(fg_prob, fg_labels, np.arange(1, n + 1))
    bbox = label_bboxes(labels, n)
    table = pd.DataFrame({
        "lesion_id": np.arange(1, n + 1, dtype=np.int64),
        "voxels": counts,
        "volume_ul": counts * voxel_volume_ul(affine),
        "centroid_i": centroid[:, 0], "centroid_j": centroid[:, 1], "centroid_k": centroid[:, 2],
        "centroid_x": world[:, 0], "centroid_y": world[:, 1], "centroid_z": world[:, 2],
        "bbox_i0": bbox[:, 0], "bbox_j0": bbox[:, 1], "bbox_k0": bbox[:, 2],
        "bbox_i1": bbox[:, 3], "bbox_j1": bbox[:, 4], "bbox_k1": bbox[:, 5],
        "mean_prob": mean_prob, "max_prob": max_prob,
        "uncertainty": fold_uncertainty(labels, n, fold_labels),
    })
    return table[LESION_COLUMNS]


# ---------------------------------------------------------------- out-of-distribution check

# Thresholds of the intensity OOD rule (docs/engine.md, "Out-of-distribution warning").
OOD_MEDIAN_FACTOR = 3.0        # brain median vs training lesion median: outside [1/3, 3]x
OOD_OUTSIDE_FRACTION = 0.25    # share of brain voxels far outside the training lesion range
OOD_NEGATIVE_FRACTION = 0.01   # share of negative brain voxels when training had none
_OOD_SAMPLE = 2_000_000


def intensity_ood(values: np.ndarray, fingerprint: dict[str, float] | None) -> str | None:
    """A warning when the brain intensities of an image are far from the model's training fingerprint.

    ``values``: raw intensities of the brain voxels. ``fingerprint``: nnU-Net's
    ``foreground_intensity_properties_per_channel['0']`` (raw intensities of the training lesion voxels:
    mean, median, std, percentile_00_5, percentile_99_5, min, max). The network z-scores each image, so
    only gross departures matter; they usually mean the wrong image (another contrast, a T1 map, a
    rescaled/float image, a non-skull-stripped head). Flags, any of:

    1. non-finite intensities;
    2. brain median outside [1/3, 3] x the training lesion median;
    3. more than 25 % of brain voxels outside [p0.5 - R, p99.5 + R], R = p99.5 - p0.5 of training;
    4. more than 1 % negative brain voxels when the training lesions had no negative value.
    """
    values = np.asarray(values).ravel()
    if values.size == 0:
        return "no brain voxels (empty brain mask or all-zero image)"
    if not np.all(np.isfinite(values)):
        return "the image has non-finite (NaN/inf) intensities inside the brain"
    if not fingerprint:
        return None
    if values.size > _OOD_SAMPLE:  # percentiles of a fixed random subset: fast and deterministic
        values = np.random.default_rng(0).choice(values, _OOD_SAMPLE, replace=False)
    reasons = []
    median = float(np.median(values))
    train_median = float(fingerprint.get("median", fingerprint.get("mean", 0.0)))
    if train_median > 0:
        ratio = median / train_median
        if not (1.0 / OOD_MEDIAN_FACTOR <= ratio <= OOD_MEDIAN_FACTOR):
            reasons.append(f"median brain intensity {median:.4g} is {ratio:.2g}x the training lesion "
                           f"median {train_median:.4g}")
    lo, hi = fingerprint.get("percentile_00_5"), fingerprint.get("percentile_99_5")
    if lo is not None and hi is not None and hi > lo:
        span = hi - lo
        outside = float(np.mean((values < lo - span) | (values > hi + span)))
        if outside > OOD_OUTSIDE_FRACTION:
            reasons.append(f"{outside:.0%} of brain voxels lie far outside the training intensity range "
                           f"[{lo:.4g}, {hi:.4g}]")
    if float(fingerprint.get("min", 0.0)) >= 0:
        negative = float(np.mean(values < 0))
        if negative > OOD_NEGATIVE_FRACTION:
            reasons.append(f"{negative:.1%} of brain voxels are negative (training images had none)")
    if not reasons:
        return None
    return ("intensities unlike the training data (wrong contrast or scaling?): " + "; ".join(reasons))


def summarize(table: pd.DataFrame, record: SegmentationRecord) -> dict[str, Any]:
    """The per-image summary of a lesion table under the engine's settings (the one copy of the counts).

    ``LesionCount``, ``TotalVolume_uL`` and ``MedianVolume_uL`` from the table, then the settings of
    ``record`` under the summary JSON's names; the writer adds Sequence, Inputs, ... to this.
    """
    volumes = table["volume_ul"].to_numpy(dtype=float) if len(table) else np.zeros(0)
    return {
        "LesionCount": int(len(table)),
        "TotalVolume_uL": float(volumes.sum()),
        "MedianVolume_uL": float(np.median(volumes)) if volumes.size else 0.0,
        **record.summary_fields(),
    }
