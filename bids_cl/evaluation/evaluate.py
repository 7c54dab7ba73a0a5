"""Evaluate one predicted mask against its reference: image-level row and per-lesion rows.

Reads only files: the prediction (and its summary JSON), the reference mask, and when present the
phantom truth beside it (instance dseg + lesion stats TSV for lesion types, WML mask for the "WML
called CL" rate). Everything is computed on the prediction's voxel grid.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from bids_cl.derivatives import spec
from bids_cl.errors import EXIT_BAD_DATA, BidsClError
from bids_cl.evaluation.metrics import (
    DEFAULT_CRITERION,
    DEFAULT_NDSC_R,
    DEFAULT_THRESHOLD,
    DEFAULT_ZERO_DIVISION,
    LesionMatch,
    majority_partner,
    match_lesions,
    safe_ratio,
    scores,
    voxel_counts,
)
from bids_cl.evaluation.pairing import Pair, sibling
from bids_cl.utils.components import (
    DEFAULT_CONNECTIVITY,
    label_centroids,
    label_components,
    overlap_pairs,
)

TRUTH_DSEG_SUFFIX = spec.suffix_of("lesions_dseg", spec.REFERENCE)
TRUTH_STATS_SUFFIX = spec.suffix_of("lesions_table", spec.REFERENCE)
WML_MASK_SUFFIX = spec.suffix_of("wml_mask", spec.REFERENCE)
SUMMARY_SUFFIX = spec.suffix_of("summary")
NA = "n/a"
NO_TRUTH = "none"  # type of a lesion that overlaps no truth instance

# Affines closer than this (mm, element-wise) are the same grid: headers store float32.
GRID_ATOL_MM = 1e-3


@dataclass(frozen=True)
class EvaluationSettings:
    """How lesions are defined and matched, and which 0/0 convention the scores follow."""

    criterion: str = DEFAULT_CRITERION
    threshold: float = DEFAULT_THRESHOLD
    connectivity: int = DEFAULT_CONNECTIVITY
    ndsc_r: float = DEFAULT_NDSC_R
    zero_division: str = DEFAULT_ZERO_DIVISION


@dataclass
class ImageEvaluation:
    """Result for one pair: one images.tsv row, lesions.tsv rows, and warnings to show."""

    image: dict[str, object]
    lesions: pd.DataFrame
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Volume:
    """Voxel data and grid of a NIfTI image."""

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


def load_volume(path: Path) -> Volume:
    """Read a 3-D NIfTI (a trailing singleton 4th axis is dropped); BidsClError(65) if unusable."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, gzip.BadGzipFile, zlib.error,
            nib.filebasedimages.ImageFileError) as exc:
        raise BidsClError(f"cannot read NIfTI {path}: {exc}", EXIT_BAD_DATA) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BidsClError(f"{path} is not a 3-D image (shape {data.shape})", EXIT_BAD_DATA)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    # NIfTI data come Fortran-ordered; labelling, np.nonzero and masking run 2-5x faster on
    # C-ordered arrays, which more than pays for this one copy.
    return Volume(
        data=np.ascontiguousarray(data), affine=np.asarray(img.affine, dtype=float), zooms=zooms
    )


def same_grid(a: Volume, b: Volume, atol_mm: float = GRID_ATOL_MM) -> bool:
    """Same voxel grid: equal shape and (to header precision) equal voxel-to-world affine."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol_mm)


def resample_nearest(source: Volume, target: Volume) -> np.ndarray:
    """`source` data on `target`'s grid, nearest neighbour in world space (0 outside the source).

    Each target voxel takes the source voxel at inv(A_source) · A_target · ijk; nearest neighbour
    keeps masks binary and instance ids intact.
    """
    target_to_source = np.linalg.inv(source.affine) @ target.affine
    return ndimage.affine_transform(
        source.data,
        target_to_source[:3, :3],
        offset=target_to_source[:3, 3],
        output_shape=target.shape,
        order=0,
        mode="constant",
        cval=0,
    )


def on_prediction_grid(
    path: Path, prediction: Volume, what: str, prefix: str, warnings: list[str]
) -> tuple[np.ndarray, bool]:
    """Load `path` and bring it onto the prediction grid. Returns (data, whether resampled)."""
    volume = load_volume(path)
    if same_grid(volume, prediction):
        return volume.data, False
    warnings.append(
        f"{prefix}: {what} grid {volume.shape} differs from the prediction's {prediction.shape};"
        " resampled to the prediction grid (nearest neighbour, world space)"
    )
    return resample_nearest(volume, prediction), True


def read_summary(prediction_path: Path, prefix: str) -> dict[str, object]:
    """FieldStrength and Sequence from the prediction's summary JSON (n/a when absent)."""
    path = sibling(prediction_path, prefix, SUMMARY_SUFFIX)
    summary: dict[str, object] = {}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            summary = {}
    values = {"field_strength": summary.get("FieldStrength"), "sequence": summary.get("Sequence")}
    return {key: NA if value is None else value for key, value in values.items()}


def read_truth_stats(path: Path) -> pd.DataFrame | None:
    """The phantom lesion table (lesion_id, type, label, ...), indexed by lesion_id; None if absent."""
    if not path.is_file():
        return None
    table = pd.read_csv(path, sep="\t", dtype={"lesion_id": "int64"}, na_values=[NA])
    return table.set_index("lesion_id")


def majority_truth(labels: np.ndarray, n_labels: int, truth_ids: np.ndarray) -> np.ndarray:
    """Truth instance id covering most voxels of each lesion 1..n_labels (0 when none)."""
    truth = truth_ids
    if not np.issubdtype(truth.dtype, np.integer):  # float-stored ids: round, NaN -> background
        truth = np.rint(np.nan_to_num(truth)).astype(np.int64)
    best, _ = majority_partner(overlap_pairs(labels, truth), n_labels)  # ids <= 0 are ignored
    return best


def truth_columns(truth_ids: np.ndarray, stats: pd.DataFrame | None) -> dict[str, list[object]]:
    """truth_id, type and truth_label columns for lesions mapped to truth ids (0 = no truth).

    A lesion on no truth instance gets type "none"; a truth id missing from the stats table (or
    no table) gives n/a.
    """
    types, kinds = [], []
    for truth_id in truth_ids.tolist():
        row = stats.loc[truth_id] if stats is not None and truth_id in stats.index else None
        if truth_id == 0:
            types.append(NO_TRUTH)
            kinds.append(NO_TRUTH)
            continue
        types.append(NA if row is None else str(row.get("type", NA)))
        kinds.append(NA if row is None else str(row.get("label", NA)))
    return {
        "truth_id": [int(t) if t > 0 else NA for t in truth_ids.tolist()],
        "type": types,
        "truth_label": kinds,
    }


def _ids_text(ids: np.ndarray) -> str:
    return ";".join(str(int(i)) for i in np.sort(ids)) if ids.size else NA


def lesion_rows(
    match: LesionMatch,
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    affine: np.ndarray,
    voxel_volume_ul: float,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-lesion tables (predicted, reference) without image identifiers or truth columns."""
    tables = []
    for source, labels, n in (
        ("prediction", pred_labels, match.n_pred),
        ("reference", gt_labels, match.n_gt),
    ):
        centroid_ijk = label_centroids(labels, n)
        centroid_xyz = nib.affines.apply_affine(affine, centroid_ijk) if n else centroid_ijk
        is_pred = source == "prediction"
        own, other = (
            (match.pairs.a_id, match.pairs.b_id) if is_pred
            else (match.pairs.b_id, match.pairs.a_id)
        )
        voxels = match.pred_voxels if is_pred else match.gt_voxels
        table = pd.DataFrame({
            "source": source,
            "lesion_id": np.arange(1, n + 1),
            "verdict": match.pred_verdict if is_pred else match.gt_verdict,
            "score": match.pred_score if is_pred else np.nan,
            "iou_adj": match.pred_iou_adj if is_pred else np.nan,
            "best_iou": match.pred_best_iou if is_pred else match.gt_best_iou,
            # object columns keep True/False/None through the concatenation with other rows
            "matched_by_tp": np.full(n, None, object) if is_pred
            else match.gt_matched_by_tp.astype(object),
            "overlapping_ids": [_ids_text(other[own == i]) for i in range(1, n + 1)],
            "voxels": voxels,
            "volume_ul": voxels * voxel_volume_ul,
            "centroid_i": centroid_ijk[:, 0],
            "centroid_j": centroid_ijk[:, 1],
            "centroid_k": centroid_ijk[:, 2],
            "centroid_x": centroid_xyz[:, 0],
            "centroid_y": centroid_xyz[:, 1],
            "centroid_z": centroid_xyz[:, 2],
        })
        tables.append(table)
    return tables[0], tables[1]


def evaluate_pair(
    pair: Pair, settings: EvaluationSettings = EvaluationSettings(), *, label: str = "CL"
) -> ImageEvaluation:
    """Evaluate one prediction against its reference (and the phantom truth when present)."""
    warnings: list[str] = []
    prediction = load_volume(pair.prediction)
    reference, resampled = on_prediction_grid(
        pair.reference, prediction, "reference", pair.prefix, warnings
    )
    pred_mask = np.asarray(prediction.data) > 0
    gt_mask = np.asarray(reference) > 0
    voxel_volume_ul = float(np.prod(prediction.zooms))

    pred_labels, n_pred = label_components(pred_mask, settings.connectivity)
    gt_labels, n_gt = label_components(gt_mask, settings.connectivity)
    match = match_lesions(
        pred_labels, n_pred, gt_labels, n_gt,
        criterion=settings.criterion, threshold=settings.threshold,
    )
    counts = match.counts
    voxels = voxel_counts(pred_mask, gt_mask)
    pred_table, gt_table = lesion_rows(
        match, pred_labels, gt_labels, prediction.affine, voxel_volume_ul
    )

    # Phantom truth: the lesion type of each GT component is that of the truth instance covering
    # most of it; a prediction gets the type of the truth instance it overlaps most.
    dseg_path = sibling(pair.reference, pair.prefix, TRUTH_DSEG_SUFFIX)
    has_truth = dseg_path.is_file()
    if has_truth:
        truth_ids, _ = on_prediction_grid(dseg_path, prediction, "truth dseg", pair.prefix, warnings)
        stats = read_truth_stats(sibling(pair.reference, pair.prefix, TRUTH_STATS_SUFFIX))
        for table, labels, n in ((pred_table, pred_labels, n_pred), (gt_table, gt_labels, n_gt)):
            for column, values in truth_columns(
                majority_truth(labels, n, truth_ids), stats
            ).items():
                table[column] = values

    # WML distractors: WML lesions (components of the WML mask) that a predicted lesion touches.
    wml_path = sibling(pair.reference, pair.prefix, WML_MASK_SUFFIX)
    wml = {"wml_lesions": np.nan, "wml_called_cl": np.nan, "wml_called_cl_rate": np.nan,
           "pred_on_wml": np.nan}
    pred_table["on_wml"] = np.full(n_pred, None, object)
    if label != "WML" and wml_path.is_file():
        wml_data, _ = on_prediction_grid(wml_path, prediction, "WML mask", pair.prefix, warnings)
        wml_labels, n_wml = label_components(np.asarray(wml_data) > 0, settings.connectivity)
        wml_pairs = overlap_pairs(pred_labels, wml_labels)
        on_wml = np.zeros(n_pred, dtype=bool)
        on_wml[wml_pairs.a_id - 1] = True
        pred_table["on_wml"] = on_wml.astype(object)
        called = int(np.unique(wml_pairs.b_id).size)
        wml = {
            "wml_lesions": n_wml,
            "wml_called_cl": called,
            "wml_called_cl_rate": float(safe_ratio(called, n_wml, 0.0)),
            # predictions whose only overlap is a WML: the distractor produced a false CL
            "pred_on_wml": int(np.sum(on_wml & (match.pred_overlap == 0))),
        }

    entities = pair.entities
    identity = {
        "prefix": pair.prefix,
        "participant_id": f"sub-{entities.get('sub', NA)}",
        "session": entities.get("ses", NA),
        "acquisition": entities.get("acq", NA),
    }
    image: dict[str, object] = dict(identity)
    image.update(read_summary(pair.prediction, pair.prefix))
    image.update({
        "n_gt": match.n_gt,
        "n_pred": match.n_pred,
        "tp": counts.tp,
        "fp": counts.fp,
        "usl": counts.usl,
        "fn": counts.fn,
        "detected": match.n_gt - counts.fn,
    })
    image.update(scores(counts, voxels, r=settings.ndsc_r, zero_division=settings.zero_division))
    image.update({
        "voxel_tp": voxels.tp,
        "voxel_fp": voxels.fp,
        "voxel_fn": voxels.fn,
        "n_voxels": voxels.n_voxels,
        "voxel_volume_ul": voxel_volume_ul,
        "gt_volume_ul": voxels.gt_voxels * voxel_volume_ul,
        "pred_volume_ul": voxels.pred_voxels * voxel_volume_ul,
        **wml,
        "has_truth_types": has_truth,
        "resampled": resampled,
        "prediction": str(pair.prediction),
        "reference": str(pair.reference),
    })
    lesions = pd.concat([pred_table, gt_table], ignore_index=True)
    for position, (column, value) in enumerate(identity.items()):
        lesions.insert(position, column, value)
    return ImageEvaluation(image=image, lesions=lesions, warnings=warnings)
