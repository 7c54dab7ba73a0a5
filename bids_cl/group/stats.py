"""Group statistics on the per-image table (pure pandas/scipy functions, unit-tested on built tables).

Units of analysis (documented in docs/reports.md):

* descriptive statistics: one observation per *image* (participant x session x target), with the number
  of distinct participants alongside, overall and by each categorical column;
* correlations: within each session (and sequence) stratum, one observation per *participant* (the mean
  when a participant has several images in the stratum), so no participant counts twice in one test;
* longitudinal change: consecutive sessions of the same participant and target line (the prefix without
  its ``ses-`` entity), e.g. ses-01 -> ses-02.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from bids_cl.derivatives.spec import line_of

MEASURES = ("lesion_count", "total_volume_ul", "median_volume_ul")
MAX_LEVELS = 12  # more levels than this is an identifier or free text, not a grouping variable
DESCRIPTIVE_COLUMNS = ["measure", "group_by", "group", "n_images", "n_participants", "mean", "sd",
                       "median", "q1", "q3", "min", "max"]
CORRELATION_COLUMNS = ["measure", "covariate", "session_id", "sequence", "n", "rho", "p_value",
                       "note"]
LONGITUDINAL_COLUMNS = ["participant_id", "line", "session_from", "session_to",
                        "lesion_count_from", "lesion_count_to", "lesion_count_delta",
                        "total_volume_ul_from", "total_volume_ul_to", "total_volume_ul_delta",
                        "total_volume_ul_pct_change"]


def _natural(text: Any) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text)))


def classify_columns(participants: pd.DataFrame, sidecar: Mapping[str, Any] | None = None,
                     *, max_levels: int = MAX_LEVELS) -> tuple[list[str], list[str]]:
    """Split participants.tsv columns into (categorical, numeric); ``participant_id`` is neither.

    A column is categorical when its sidecar declares ``Levels`` or when any value is not a number;
    otherwise numeric (age, EDSS, disease duration). Categorical columns with more than
    ``max_levels`` levels, or with a different value for every participant, are left out: they are
    identifiers or free text, and grouping by them would make one group per participant.
    """
    sidecar = sidecar or {}
    categorical, numeric = [], []
    for col in participants.columns:
        if col == "participant_id":
            continue
        values = participants[col].dropna()
        if values.empty:
            continue
        declared_levels = isinstance(sidecar.get(col), Mapping) and "Levels" in sidecar[col]
        as_number = pd.to_numeric(values, errors="coerce")
        if not declared_levels and as_number.notna().all():
            numeric.append(col)
            continue
        n_levels = values.astype(str).nunique()
        if n_levels > max_levels or (n_levels == len(values) and len(values) > max_levels / 2):
            continue
        categorical.append(col)
    return categorical, numeric


def describe(values: Iterable[Any]) -> dict[str, float]:
    """n, mean, sd (ddof 1), median, quartiles, min, max of the finite values."""
    arr = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {"n": 0, "mean": np.nan, "sd": np.nan, "median": np.nan, "q1": np.nan,
                "q3": np.nan, "min": np.nan, "max": np.nan}
    q1, median, q3 = np.percentile(arr, [25, 50, 75])
    return {"n": int(arr.size), "mean": float(arr.mean()),
            "sd": float(arr.std(ddof=1)) if arr.size > 1 else np.nan,
            "median": float(median), "q1": float(q1), "q3": float(q3),
            "min": float(arr.min()), "max": float(arr.max())}


def descriptive_stats(table: pd.DataFrame, group_columns: Sequence[str] = (),
                      measures: Sequence[str] = MEASURES) -> pd.DataFrame:
    """One row per measure x grouping x level (``group_by='all'`` for the whole table).

    Images whose grouping value is missing are left out of that grouping (they still count in
    ``all``).
    """
    rows = []
    groupings: list[tuple[str, list[tuple[str, pd.DataFrame]]]] = [("all", [("all", table)])]
    for col in group_columns:
        if col not in table.columns or table[col].dropna().empty:
            continue
        levels = sorted(table[col].dropna().astype(str).unique(), key=_natural)
        groupings.append((col, [(lvl, table[table[col].astype(str) == lvl]) for lvl in levels]))
    for measure in measures:
        if measure not in table.columns:
            continue
        for group_by, parts in groupings:
            for level, part in parts:
                d = describe(part[measure])
                rows.append({"measure": measure, "group_by": group_by, "group": level,
                             "n_images": d.pop("n"),
                             "n_participants": int(part.loc[part[measure].notna(),
                                                            "participant_id"].nunique())
                             if "participant_id" in part else np.nan, **d})
    return pd.DataFrame(rows, columns=DESCRIPTIVE_COLUMNS)


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[int, float, float, str]:
    """(n, rho, p, note) over pairs where both are finite; NaN with a note when undefined."""
    xa = pd.to_numeric(pd.Series(list(x)), errors="coerce").to_numpy(float)
    ya = pd.to_numeric(pd.Series(list(y)), errors="coerce").to_numpy(float)
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(keep.sum())
    if n < 3:
        return n, np.nan, np.nan, "fewer than 3 observations"
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return n, np.nan, np.nan, "constant values"
    result = sps.spearmanr(xa, ya)
    return n, float(result.statistic), float(result.pvalue), ""


def correlation_stats(table: pd.DataFrame, covariates: Sequence[str],
                      measures: Sequence[str] = MEASURES) -> pd.DataFrame:
    """Spearman correlations of each measure with each numeric covariate, per session x sequence."""
    rows = []
    if table.empty:
        return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)
    frame = table.copy()
    frame["_ses"] = frame["session_id"].fillna("n/a") if "session_id" in frame else "n/a"
    frame["_seq"] = frame["sequence"].fillna("n/a") if "sequence" in frame else "n/a"
    strata = sorted(frame.groupby(["_ses", "_seq"]).groups, key=lambda k: (_natural(k[0]), k[1]))
    for covariate in covariates:
        if covariate not in frame.columns:
            continue
        frame[covariate] = pd.to_numeric(frame[covariate], errors="coerce")
        for measure in measures:
            if measure not in frame.columns:
                continue
            for ses, seq in strata:
                part = frame[(frame["_ses"] == ses) & (frame["_seq"] == seq)]
                # One observation per participant in the stratum (mean over its images).
                per = part.groupby("participant_id").agg({measure: "mean", covariate: "first"})
                n, rho, p, note = spearman(per[covariate], per[measure])
                rows.append({"measure": measure, "covariate": covariate, "session_id": ses,
                             "sequence": seq, "n": n, "rho": rho, "p_value": p, "note": note})
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)


def target_line(prefix: str) -> str:
    """The prefix without its session entity: the same acquisition followed over sessions."""
    return line_of(prefix)


def longitudinal_changes(table: pd.DataFrame) -> pd.DataFrame:
    """Change between consecutive sessions of each participant and target line."""
    rows = []
    if table.empty or "session_id" not in table or table["session_id"].dropna().empty:
        return pd.DataFrame(rows, columns=LONGITUDINAL_COLUMNS)
    frame = table[table["session_id"].notna()].copy()
    frame["line"] = frame["prefix"].map(target_line)
    for (participant, line), part in frame.groupby(["participant_id", "line"], sort=True):
        part = part.iloc[sorted(range(len(part)),
                                key=lambda i: _natural(part["session_id"].iloc[i]))]
        for a, b in zip(part.iloc[:-1].itertuples(), part.iloc[1:].itertuples(), strict=True):
            count_a, count_b = float(a.lesion_count), float(b.lesion_count)
            vol_a, vol_b = float(a.total_volume_ul), float(b.total_volume_ul)
            rows.append({
                "participant_id": participant, "line": line,
                "session_from": a.session_id, "session_to": b.session_id,
                "lesion_count_from": count_a, "lesion_count_to": count_b,
                "lesion_count_delta": count_b - count_a,
                "total_volume_ul_from": vol_a, "total_volume_ul_to": vol_b,
                "total_volume_ul_delta": vol_b - vol_a,
                "total_volume_ul_pct_change": (100.0 * (vol_b - vol_a) / vol_a) if vol_a > 0
                else np.nan,
            })
    out = pd.DataFrame(rows, columns=LONGITUDINAL_COLUMNS)
    for col in ("lesion_count_from", "lesion_count_to", "lesion_count_delta"):
        out[col] = out[col].astype("Int64")
    return out
