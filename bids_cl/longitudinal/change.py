"""Lesion matching and change classes between two sessions: pure functions, numpy in, table out.

Both label images lie on one common grid (the pair's halfway space, :mod:`bids_cl.longitudinal.align`);
lesion ids are those of each session's own lesion table. The rules (docs/longitudinal.md):

* two lesions *correspond* when their footprints come within ``tolerance_mm`` of each other (any
  shared voxel at tolerance 0); corresponding lesions form groups (connected components of the
  bipartite overlap graph);
* a later lesion in no group is ``new`` -- unless the earlier probability map reaches
  ``rescue_probability`` inside its footprint (a faint earlier lesion below the segmentation threshold):
  then its earlier extent is the volume where that probability reaches ``rescue_probability``, it is
  classed by the volume rule below and ``probability_rescued`` is true;
* an earlier lesion in no group has ``disappeared``;
* a group is ``enlarging`` when its volume grew by at least ``enlarge_relative`` (fraction of the
  earlier volume) *and* ``min_change_ul``; ``shrinking`` when it lost at least ``shrink_relative`` and
  ``min_change_ul``; else ``stable``. One earlier lesion overlapping several later ones is a ``split``,
  several earlier ones overlapping one later lesion a ``merge``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from bids_cl.derivatives.spec import CHANGE_CODES, CHANGE_COLUMNS
from bids_cl.utils.components import foreground_bbox, label_maxima, label_sizes, overlap_pairs

NEW, ENLARGING, STABLE, SHRINKING, DISAPPEARED = "new", "enlarging", "stable", "shrinking", "disappeared"
NONE, MERGE, SPLIT = "none", "merge", "split"


@dataclass(frozen=True)
class ChangeRules:
    """The thresholds of the change classes and of the alignment check (defaults: docs/longitudinal.md)."""

    tolerance_mm: float = 1.0          # footprints this close correspond (residual misalignment)
    enlarge_relative: float = 0.5      # growth >= 50% of the earlier volume ...
    shrink_relative: float = 1.0 / 3.0  # ... or loss >= 1/3 (the same factor 1.5 the other way)
    min_change_ul: float = 10.0        # ... and at least this many uL either way
    rescue_probability: float = 0.25   # earlier probability that makes a later lesion not new
    min_alignment: float = 0.8         # correlation inside the brain below which change is refused

    def __post_init__(self) -> None:
        checks = {
            "tolerance_mm": self.tolerance_mm >= 0,
            "enlarge_relative": self.enlarge_relative > 0,
            "shrink_relative": 0 < self.shrink_relative < 1,
            "min_change_ul": self.min_change_ul >= 0,
            "rescue_probability": 0 < self.rescue_probability <= 1,
            "min_alignment": -1 <= self.min_alignment <= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid change rule(s): {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class ChangeResult:
    """The core of a change table (no positions yet) and each lesion's class."""

    table: pd.DataFrame                     # CORE_COLUMNS, one row per lesion relation
    after_class: dict[int, str] = field(default_factory=dict)   # later lesion id -> class
    before_class: dict[int, str] = field(default_factory=dict)  # earlier lesion id -> class
    rescued: list[int] = field(default_factory=list)            # later ids saved by the probability rule


CORE_COLUMNS = ["lesion_id_before", "lesion_id_after", "change", "merge_split", "volume_before_ul",
                "volume_after_ul", "change_ul", "change_pct", "prior_max_prob", "probability_rescued"]


def dilate_labels(labels: np.ndarray, tolerance_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Every voxel within ``tolerance_mm`` of a lesion takes the id of its nearest lesion voxel."""
    labels = np.asarray(labels)
    box = foreground_bbox(labels > 0)
    if tolerance_mm <= 0 or box is None:
        return labels
    pad = [int(np.ceil(tolerance_mm / s)) + 1 for s in spacing]
    grown = tuple(slice(max(0, b.start - p), min(n, b.stop + p))
                  for b, p, n in zip(box, pad, labels.shape, strict=True))
    crop = labels[grown]
    distance, nearest = ndimage.distance_transform_edt(crop == 0, sampling=spacing, return_indices=True)
    dilated = crop[tuple(nearest)]
    dilated[distance > tolerance_mm] = 0
    out = labels.copy()
    out[grown] = dilated
    return out


def volumes_from_labels(labels: np.ndarray, voxel_ul: float) -> dict[int, float]:
    """``{lesion id: volume in uL}`` of a label image (ids 1..max; ids without voxels left out)."""
    n = int(np.max(labels)) if np.size(labels) else 0
    sizes = label_sizes(np.asarray(labels, dtype=np.int64), n) if n else np.zeros(0, dtype=np.int64)
    return {i + 1: float(s) * voxel_ul for i, s in enumerate(sizes) if s > 0}


def volume_class(before_ul: float, after_ul: float, rules: ChangeRules) -> str:
    """enlarging, shrinking or stable for a lesion (or group) that exists at both visits."""
    delta = after_ul - before_ul
    if delta >= rules.min_change_ul and after_ul >= (1.0 + rules.enlarge_relative) * before_ul:
        return ENLARGING
    if -delta >= rules.min_change_ul and after_ul <= (1.0 - rules.shrink_relative) * before_ul:
        return SHRINKING
    return STABLE


def _pct(before: float, after: float) -> float:
    return 100.0 * (after - before) / before if before > 0 else np.nan


def _groups(edges_before: np.ndarray, edges_after: np.ndarray, ids_before: list[int],
            ids_after: list[int]) -> list[tuple[list[int], list[int], list[tuple[int, int]]]]:
    """Connected components of the bipartite overlap graph: (earlier ids, later ids, edges)."""
    if edges_before.size == 0:
        return []
    index_b = {v: i for i, v in enumerate(ids_before)}
    index_a = {v: i + len(ids_before) for i, v in enumerate(ids_after)}
    rows = np.array([index_b[int(b)] for b in edges_before])
    cols = np.array([index_a[int(a)] for a in edges_after])
    size = len(ids_before) + len(ids_after)
    graph = coo_matrix((np.ones(rows.size), (rows, cols)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    groups: dict[int, tuple[list[int], list[int], list[tuple[int, int]]]] = {}
    for b, a in sorted(zip(edges_before.tolist(), edges_after.tolist(), strict=True)):
        g = groups.setdefault(int(component[index_b[b]]), ([], [], []))
        if b not in g[0]:
            g[0].append(b)
        if a not in g[1]:
            g[1].append(a)
        g[2].append((b, a))
    return [(sorted(b), sorted(a), e) for b, a, e in groups.values()]


def classify_change(
    before: np.ndarray,
    after: np.ndarray,
    *,
    spacing: Sequence[float],
    rules: ChangeRules | None = None,
    prob_before: np.ndarray | None = None,
    volumes_before: Mapping[int, float] | None = None,
    volumes_after: Mapping[int, float] | None = None,
) -> ChangeResult:
    """Match the lesions of two sessions on one grid and classify every one of them.

    ``before``/``after``: integer label images (0 background, each session's lesion ids) on the same
    grid with voxel ``spacing`` (mm). ``prob_before``: the earlier probability map on that grid, for the
    rescue rule (None: no rescue). ``volumes_*``: each session's own lesion volumes (uL) by id, as its
    lesion table gives them on its native grid (None: counted here); every id listed is classified,
    also one that has no voxel on this grid.
    """
    rules = rules or ChangeRules()
    before = np.asarray(before, dtype=np.int64)
    after = np.asarray(after, dtype=np.int64)
    if before.shape != after.shape:
        raise ValueError(f"label images differ in shape: {before.shape} vs {after.shape}")
    voxel_ul = float(np.prod(spacing))
    vol_b = dict(volumes_before) if volumes_before is not None else volumes_from_labels(before, voxel_ul)
    vol_a = dict(volumes_after) if volumes_after is not None else volumes_from_labels(after, voxel_ul)
    ids_b, ids_a = sorted(int(i) for i in vol_b), sorted(int(i) for i in vol_a)
    pairs = overlap_pairs(dilate_labels(before, rules.tolerance_mm, spacing), after)
    keep = np.isin(pairs.a_id, ids_b) & np.isin(pairs.b_id, ids_a)
    groups = _groups(pairs.a_id[keep], pairs.b_id[keep], ids_b, ids_a)

    prior = {}
    if prob_before is not None and ids_a:
        sizes = label_sizes(after, max(ids_a))
        present = [i for i in ids_a if sizes[i - 1] > 0]
        if present:
            maxima = label_maxima(prob_before, after, present)
            prior = {i: float(m) for i, m in zip(present, maxima, strict=True)}

    rows: list[dict[str, Any]] = []
    result = ChangeResult(table=pd.DataFrame(columns=CORE_COLUMNS))
    for group_b, group_a, edges in groups:
        total_b = sum(vol_b[b] for b in group_b)
        total_a = sum(vol_a[a] for a in group_a)
        kind = volume_class(total_b, total_a, rules)
        degree_a = {a: sum(1 for _, x in edges if x == a) for a in group_a}
        for b in group_b:
            result.before_class[b] = kind
        for a in group_a:
            result.after_class[a] = kind
        for b, a in edges:
            if len(group_b) == 1 and len(group_a) == 1:
                relation = NONE
            elif len(group_a) == 1 or degree_a[a] > 1:
                relation = MERGE
            else:
                relation = SPLIT
            rows.append({"lesion_id_before": b, "lesion_id_after": a, "change": kind,
                         "merge_split": relation, "volume_before_ul": vol_b[b],
                         "volume_after_ul": vol_a[a], "change_ul": total_a - total_b,
                         "change_pct": _pct(total_b, total_a), "prior_max_prob": prior.get(a, np.nan),
                         "probability_rescued": False})
    matched_a = set(result.after_class)
    for a in ids_a:
        if a in matched_a:
            continue
        p = prior.get(a, np.nan)
        if prob_before is not None and np.isfinite(p) and p >= rules.rescue_probability:
            faint = int(np.count_nonzero((after == a) & (prob_before >= rules.rescue_probability)))
            earlier = faint * voxel_ul
            kind = volume_class(earlier, vol_a[a], rules)
            result.rescued.append(a)
            rows.append({"lesion_id_before": None, "lesion_id_after": a, "change": kind,
                         "merge_split": NONE, "volume_before_ul": earlier, "volume_after_ul": vol_a[a],
                         "change_ul": vol_a[a] - earlier, "change_pct": _pct(earlier, vol_a[a]),
                         "prior_max_prob": p, "probability_rescued": True})
        else:
            kind = NEW
            rows.append({"lesion_id_before": None, "lesion_id_after": a, "change": NEW,
                         "merge_split": NONE, "volume_before_ul": 0.0, "volume_after_ul": vol_a[a],
                         "change_ul": vol_a[a], "change_pct": np.nan, "prior_max_prob": p,
                         "probability_rescued": False})
        result.after_class[a] = kind
    for b in ids_b:
        if b in result.before_class:
            continue
        result.before_class[b] = DISAPPEARED
        rows.append({"lesion_id_before": b, "lesion_id_after": None, "change": DISAPPEARED,
                     "merge_split": NONE, "volume_before_ul": vol_b[b], "volume_after_ul": 0.0,
                     "change_ul": -vol_b[b], "change_pct": -100.0, "prior_max_prob": np.nan,
                     "probability_rescued": False})
    table = pd.DataFrame(rows, columns=CORE_COLUMNS)
    for c in ("lesion_id_before", "lesion_id_after"):
        table[c] = pd.array(table[c].tolist(), dtype="Int64")
    for c in ("volume_before_ul", "volume_after_ul", "change_ul", "change_pct", "prior_max_prob"):
        table[c] = table[c].astype(float)
    table["probability_rescued"] = table["probability_rescued"].astype(bool)
    # Later lesions in their id order (their relations by earlier id), then what disappeared.
    order = np.lexsort((table["lesion_id_before"].fillna(0).to_numpy(),
                        table["lesion_id_after"].fillna(np.iinfo(np.int64).max).to_numpy()))
    result.table = table.iloc[order].reset_index(drop=True)
    result.rescued.sort()
    return result


def change_counts(result: ChangeResult) -> dict[str, int]:
    """Lesions per class: later lesions for new/enlarging/stable/shrinking, earlier ones for disappeared."""
    counts = {k: 0 for k in (NEW, ENLARGING, STABLE, SHRINKING)}
    for kind in result.after_class.values():
        counts[kind] += 1
    counts[DISAPPEARED] = sum(1 for k in result.before_class.values() if k == DISAPPEARED)
    return counts


def change_map(after_labels: np.ndarray, before_labels: np.ndarray, after_class: Mapping[int, str],
               before_class: Mapping[int, str]) -> np.ndarray:
    """uint8 map of change classes on the later grid (:data:`~bids_cl.derivatives.spec.CHANGE_CODES`).

    ``after_labels``: the later session's lesion ids on its own grid; ``before_labels``: the earlier
    session's ids mapped onto that grid (only disappeared lesions are drawn from it, where no later
    lesion lies).
    """
    out = np.zeros(np.shape(after_labels), dtype=np.uint8)
    lut_a = np.zeros(int(np.max(after_labels, initial=0)) + 1, dtype=np.uint8)
    for lesion, kind in after_class.items():
        if 0 < lesion < lut_a.size:
            lut_a[lesion] = CHANGE_CODES[kind]
    after_labels = np.asarray(after_labels, dtype=np.int64)
    out[:] = lut_a[after_labels]
    gone = [b for b, k in before_class.items() if k == DISAPPEARED]
    if gone:
        footprint = np.isin(before_labels, gone) & (out == 0)
        out[footprint] = CHANGE_CODES[DISAPPEARED]
    return out


def complete_table(core: pd.DataFrame, before_table: pd.DataFrame, after_table: pd.DataFrame,
                   before_xyz_in_after: np.ndarray | None = None) -> pd.DataFrame:
    """Add positions and probabilities from the two lesion tables: the contract's columns, in order.

    ``before_xyz_in_after``: the earlier table's centroids (rows in its order) mapped into the later
    session's scanner space (for disappeared lesions); None leaves them n/a.
    """
    table = core.copy()
    after = after_table.set_index("lesion_id")
    before = before_table.set_index("lesion_id")
    mapped = None
    if before_xyz_in_after is not None and len(before_table):
        mapped = pd.DataFrame(np.asarray(before_xyz_in_after, dtype=float).reshape(-1, 3),
                              index=before_table["lesion_id"].to_numpy(),
                              columns=["centroid_x", "centroid_y", "centroid_z"])

    def lookup(frame: pd.DataFrame | None, ids: pd.Series, column: str) -> np.ndarray:
        values = np.full(len(ids), np.nan)
        if frame is None or column not in frame.columns:
            return values
        for row, lesion in enumerate(ids):
            if pd.notna(lesion) and int(lesion) in frame.index:
                values[row] = float(frame.at[int(lesion), column])
        return values

    ids_a, ids_b = table["lesion_id_after"], table["lesion_id_before"]
    gone = table["lesion_id_after"].isna().to_numpy()
    for axis in "xyz":
        c = f"centroid_{axis}"
        values = lookup(after, ids_a, c)
        values[gone] = lookup(mapped, ids_b, c)[gone]
        table[c] = values
    for axis in "xyz":
        c = f"template_{axis}"
        values = lookup(after, ids_a, c)
        values[gone] = lookup(before, ids_b, c)[gone]
        table[c] = values
    table["mean_prob_before"] = lookup(before, ids_b, "mean_prob")
    table["mean_prob_after"] = lookup(after, ids_a, "mean_prob")
    return table[CHANGE_COLUMNS]
