"""Group tables of lesion change between sessions: new and enlarging cortical lesions per participant
and pair of visits, with an annualised new-lesion rate when ``sessions.tsv`` dates the visits.

Reads the change summaries of the participant runs (``reader.collect_changes``) and
``bids_dir/sub-<label>/sub-<label>_sessions.tsv`` (``session_id``, ``acq_time``); pure pandas
otherwise. A pair whose alignment was refused has its reason and no counts (n/a, never 0).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_cl.derivatives.reader import ChangeOutputs, collect_changes, participant_label
from bids_cl.group.stats import LONGITUDINAL_COLUMNS, target_line

LOGGER = logging.getLogger("bids_cl.group")

DAYS_PER_YEAR = 365.25
COUNT_COLUMNS = {"New": "new_cl", "Enlarging": "enlarging_cl", "Stable": "stable_cl",
                 "Shrinking": "shrinking_cl", "Disappeared": "disappeared_cl"}
CHANGE_COLUMNS: dict[str, dict[str, Any]] = {
    "participant_id": {"Description": "participant (BIDS label with sub- prefix)"},
    "line": {"Description": "target line: the prefix without its ses- entity"},
    "session_from": {"Description": "earlier session of the pair (ses- prefix)"},
    "session_to": {"Description": "later session of the pair (ses- prefix)"},
    "earlier": {"Description": "prefix of the earlier session's target"},
    "later": {"Description": "prefix of the later session's target"},
    "new_cl": {"Description": "new cortical lesions since the earlier session; n/a when refused"},
    "enlarging_cl": {"Description": "enlarging cortical lesions; n/a when refused"},
    "stable_cl": {"Description": "stable cortical lesions; n/a when refused"},
    "shrinking_cl": {"Description": "shrinking cortical lesions; n/a when refused"},
    "disappeared_cl": {"Description": "cortical lesions of the earlier session gone at the later "
                                      "one; n/a when refused"},
    "net_volume_change_ul": {"Description": "total lesion volume, later minus earlier",
                             "Units": "uL"},
    "alignment_quality": {"Description": "correlation of the two aligned images inside the brain"},
    "alignment_accepted": {"Description": "whether the alignment passed the quality rule"},
    "refused": {"Description": "why no change was classified, n/a when it was"},
    "years": {"Description": "time between the two visits from sessions.tsv acq_time; n/a when "
                             "a date is missing", "Units": "year"},
    "new_cl_per_year": {"Description": "annualised new-lesion rate: new_cl / years (n/a without "
                                       "both dates, or when the visits share a date)",
                        "Units": "lesions/year"},
}
#: change columns the longitudinal statistics gain (consecutive pairs)
LONGITUDINAL_CHANGE_COLUMNS = ["new_cl", "enlarging_cl", "shrinking_cl", "disappeared_cl",
                               "years", "new_cl_per_year"]
#: change measures summarised like the per-image measures (one observation per pair)
CHANGE_MEASURES = ("new_cl", "enlarging_cl", "new_cl_per_year")


def read_session_dates(bids_dir: Path | None, participant: str) -> dict[str, pd.Timestamp]:
    """``ses-<label>`` -> acquisition time from the participant's ``sessions.tsv`` (empty when the
    file, the column or a date is missing or unreadable)."""
    if bids_dir is None:
        return {}
    label = participant_label(participant)
    path = Path(bids_dir) / f"sub-{label}" / f"sub-{label}_sessions.tsv"
    if not path.is_file():
        return {}
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a", ""],
                            keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        LOGGER.warning("cannot read %s: %s", path, exc)
        return {}
    if "session_id" not in frame or "acq_time" not in frame:
        return {}
    times = pd.to_datetime(frame["acq_time"], errors="coerce", format="ISO8601")
    out = {}
    for session, time in zip(frame["session_id"], times, strict=True):
        if isinstance(session, str) and pd.notna(time):
            out[session if session.startswith("ses-") else f"ses-{session}"] = time
    return out


def years_between(earlier: pd.Timestamp | None, later: pd.Timestamp | None) -> float:
    """Years (365.25 days) from one visit to the next; NaN when a date is missing."""
    if earlier is None or later is None:
        return np.nan
    return float((later - earlier).total_seconds()) / (DAYS_PER_YEAR * 86400.0)


def annual_rate(count: float, years: float) -> float:
    """``count / years``; NaN without a count or without a positive interval."""
    if count is None or not np.isfinite(count) or not np.isfinite(years) or years <= 0:
        return np.nan
    return float(count) / years


def change_row(change: ChangeOutputs, dates: Mapping[str, pd.Timestamp]) -> dict[str, Any]:
    """One row of ``group_desc-change_stats.tsv`` from a change summary."""
    s = change.summary
    ses_from, ses_to = f"ses-{change.earlier_session}", f"ses-{change.session}"
    row: dict[str, Any] = {
        "participant_id": f"sub-{change.participant}", "line": target_line(change.prefix),
        "session_from": ses_from, "session_to": ses_to,
        "earlier": change.earlier_prefix, "later": change.prefix,
    }
    for key, column in COUNT_COLUMNS.items():
        value = s.get(key)
        row[column] = float(value) if value is not None and not change.refused else np.nan
    row["net_volume_change_ul"] = s.get("NetVolumeChange_uL")
    row["alignment_quality"] = s.get("AlignmentQuality")
    row["alignment_accepted"] = s.get("AlignmentAccepted")
    row["refused"] = change.refused
    row["years"] = years_between(dates.get(ses_from), dates.get(ses_to))
    row["new_cl_per_year"] = annual_rate(row["new_cl"], row["years"])
    return row


def change_table(out_dir: Path, labels: Iterable[str], bids_dir: Path | None) -> pd.DataFrame:
    """Every pair of sessions of the given participants (``CHANGE_COLUMNS``)."""
    rows = []
    for label in labels:
        changes = collect_changes(Path(out_dir), label)
        if not changes:
            continue
        dates = read_session_dates(bids_dir, label)
        rows += [change_row(c, dates) for c in changes]
    frame = pd.DataFrame(rows, columns=list(CHANGE_COLUMNS))
    for column in COUNT_COLUMNS.values():
        frame[column] = frame[column].astype("Float64").round().astype("Int64")
    return frame


def with_change_columns(longitudinal: pd.DataFrame, changes: pd.DataFrame) -> pd.DataFrame:
    """The longitudinal statistics (consecutive sessions) with the lesion-change columns of the
    same pair (n/a where no change output exists)."""
    keys = ["participant_id", "line", "session_from", "session_to"]
    if changes.empty:
        out = longitudinal.copy()
        for column in LONGITUDINAL_CHANGE_COLUMNS:
            out[column] = pd.Series(dtype="Int64" if column.endswith("_cl") else float)
        return out.reindex(columns=[*LONGITUDINAL_COLUMNS, *LONGITUDINAL_CHANGE_COLUMNS])
    right = changes[keys + LONGITUDINAL_CHANGE_COLUMNS].drop_duplicates(keys)
    return longitudinal.merge(right, on=keys, how="left")
