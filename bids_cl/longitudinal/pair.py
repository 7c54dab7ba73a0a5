"""One pair of sessions from files to results: the alignment record, then the change table, the change
map and the summary, in memory (the one writer, :func:`bids_cl.derivatives.writer.write_change_derivatives`,
writes them). File-level, so the Nipype interfaces stay thin and the step is testable without Nipype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bids_cl.derivatives.records import AlignmentRecord
from bids_cl.errors import EXIT_BAD_DATA, BidsClError
from bids_cl.longitudinal.align import (
    RIGID_WORK_MM,
    HalfwaySpace,
    alignment_quality,
    symmetric_rigid,
)
from bids_cl.longitudinal.change import (
    MERGE,
    SPLIT,
    ChangeRules,
    change_counts,
    change_map,
    classify_change,
    complete_table,
)
from bids_cl.preproc._ants_worker import SLOPPY_MM
from bids_cl.preproc._images import load_3d
from bids_cl.utils.components import label_components, label_sizes

ALIGNMENT_METHOD = ("antspyx rigid registration in both directions at {mm:g} mm ({threads} ITK "
                    "thread(s), fixed seed), averaged; lesions compared in the halfway space")


@dataclass(frozen=True)
class SessionFiles:
    """What the change step reads of one session (its target's outputs)."""

    prefix: str
    lesion_mask: str
    probseg: str
    lesions_tsv: str          # the session's lesion table (ids, volumes, centroids, template coords)
    connectivity: int = 26    # the connectivity its lesions were labelled with


@dataclass
class PairChange:
    table: pd.DataFrame | None       # spec.CHANGE_COLUMNS; None when refused
    dseg: nib.Nifti1Image | None     # uint8 change classes on the later grid; None when refused
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def refused(self) -> str | None:
        return self.summary.get("Refused")


def align_files(before_brain: str, before_mask: str, after_brain: str, after_mask: str, *, seed: int,
                nthreads: int = 1, sloppy: bool = False) -> AlignmentRecord:
    """Align two sessions' skull-stripped images (symmetric rigid) and measure how well they agree."""
    start = time.perf_counter()
    m = symmetric_rigid(before_brain, after_brain, seed=seed, nthreads=nthreads, sloppy=sloppy)
    quality = alignment_quality(before_brain, before_mask, after_brain, after_mask, m)
    unaligned = alignment_quality(before_brain, before_mask, after_brain, after_mask, np.eye(4))
    return AlignmentRecord(before_to_after=[[float(v) for v in row] for row in m],
                           quality=float(quality), quality_unaligned=float(unaligned),
                           method=ALIGNMENT_METHOD.format(mm=SLOPPY_MM if sloppy else RIGID_WORK_MM,
                                                          threads=max(1, int(nthreads))),
                           seed=int(seed),
                           seconds=round(time.perf_counter() - start, 3))


def session_labels(files: SessionFiles) -> tuple[nib.Nifti1Image, np.ndarray, pd.DataFrame]:
    """The session's mask image, its lesion labels (ids of its table) and its table; they must agree."""
    mask_img = load_3d(files.lesion_mask, f"lesion mask of {files.prefix}")
    labels, n = label_components(np.asanyarray(mask_img.dataobj) > 0, files.connectivity)
    table = pd.read_csv(files.lesions_tsv, sep="\t")
    voxels = label_sizes(labels, n)
    if n != len(table) or (n and not np.array_equal(voxels, table["voxels"].to_numpy(dtype=np.int64))):
        raise BidsClError(f"the lesion table of {files.prefix} does not match its lesion mask "
                          f"({len(table)} rows, {n} lesions at connectivity {files.connectivity})",
                          EXIT_BAD_DATA)
    return mask_img, labels, table


def _round(value: float, digits: int = 4) -> float:
    return float(round(float(value), digits))


def compute_change(before: SessionFiles, after: SessionFiles, alignment: AlignmentRecord,
                   rules: ChangeRules | None = None) -> PairChange:
    """Classify the change from ``before`` to ``after`` (files), or refuse when the alignment is poor."""
    before_img, before_labels, before_table = session_labels(before)
    after_img, after_labels, after_table = session_labels(after)
    prob_before = np.asanyarray(load_3d(before.probseg, f"probability of {before.prefix}").dataobj)
    return change_from_labels(
        LabelledSession(before.prefix, before_img, before_labels, before_table, prob_before),
        LabelledSession(after.prefix, after_img, after_labels, after_table, None),
        alignment, rules)


@dataclass(frozen=True)
class LabelledSession:
    """One session in memory: its grid (``image``), lesion ids, lesion table and probability map."""

    prefix: str
    image: nib.Nifti1Image
    labels: np.ndarray
    table: pd.DataFrame      # lesion_id, volume_ul, centroid_x/y/z (+ mean_prob, template_x/y/z)
    probability: np.ndarray | None


def change_from_labels(before: LabelledSession, after: LabelledSession, alignment: AlignmentRecord,
                       rules: ChangeRules | None = None) -> PairChange:
    """The change table, map and summary of two labelled sessions and their alignment."""
    rules = rules or ChangeRules()
    before_table, after_table = before.table, after.table
    total_b = float(before_table["volume_ul"].sum()) if len(before_table) else 0.0
    total_a = float(after_table["volume_ul"].sum()) if len(after_table) else 0.0
    accepted = alignment.quality >= rules.min_alignment
    summary: dict[str, Any] = {
        "LesionCountBefore": len(before_table),
        "LesionCountAfter": len(after_table),
        "TotalVolumeBefore_uL": _round(total_b, 3),
        "TotalVolumeAfter_uL": _round(total_a, 3),
        "NetVolumeChange_uL": _round(total_a - total_b, 3),
        "AlignmentQuality": _round(alignment.quality),
        "AlignmentQualityUnaligned": _round(alignment.quality_unaligned),
        "AlignmentAccepted": bool(accepted),
        "Alignment": {"Method": alignment.method, "Seed": alignment.seed,
                      "BeforeToAfter": [[_round(v, 6) for v in row] for row in alignment.before_to_after]},
        "Rules": rules.to_dict(),
        "Earlier": before.prefix,
        "Later": after.prefix,
        "Refused": None,
    }
    if not accepted:
        summary.update({k: None for k in ("New", "Enlarging", "Stable", "Shrinking", "Disappeared",
                                          "Merges", "Splits", "ProbabilityRescued")})
        summary["Refused"] = (f"alignment of {before.prefix} and {after.prefix} is poor (correlation "
                              f"{alignment.quality:.3f} inside the brain < {rules.min_alignment:g}): no "
                              "lesion change was classified")
        return PairChange(table=None, dseg=None, summary=summary)

    space = HalfwaySpace(np.asarray(alignment.before_to_after), before.image.affine, after.image.affine,
                         after.image.shape)
    prob = None if before.probability is None else space.from_before(before.probability, order=1)
    result = classify_change(
        space.from_before(before.labels, order=0), space.from_after(after.labels, order=0),
        spacing=space.spacing, rules=rules, prob_before=prob,
        volumes_before=dict(zip(before_table["lesion_id"].astype(int), before_table["volume_ul"],
                                strict=True)),
        volumes_after=dict(zip(after_table["lesion_id"].astype(int), after_table["volume_ul"],
                               strict=True)),
    )
    mapped = space.points_to_after(before_table[["centroid_x", "centroid_y", "centroid_z"]]
                                   .to_numpy(dtype=float)) if len(before_table) else None
    table = complete_table(result.table, before_table, after_table, mapped)
    codes = change_map(after.labels, space.to_after(before.labels, order=0), result.after_class,
                       result.before_class)
    header = after.image.header.copy()
    header.set_data_dtype(np.uint8)
    dseg = nib.Nifti1Image(codes, after.image.affine, header)
    dseg.header.set_slope_inter(1.0, 0.0)
    counts = change_counts(result)
    summary.update({
        "New": counts["new"], "Enlarging": counts["enlarging"], "Stable": counts["stable"],
        "Shrinking": counts["shrinking"], "Disappeared": counts["disappeared"],
        "Merges": int(table.loc[table["merge_split"] == MERGE, "lesion_id_after"].nunique()),
        "Splits": int(table.loc[table["merge_split"] == SPLIT, "lesion_id_before"].nunique()),
        "ProbabilityRescued": len(result.rescued),
    })
    return PairChange(table=table, dseg=dseg, summary=summary)
