"""Unit tests of the group statistics on small constructed tables (no files, no images)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bids_cl.group.stats import (
    classify_columns,
    correlation_stats,
    describe,
    descriptive_stats,
    longitudinal_changes,
    spearman,
    target_line,
)


def _images() -> pd.DataFrame:
    """4 participants x 2 sessions (sub-04 only ses-01), one MP2RAGE target each."""
    rows = []
    counts = {("01", "01"): 2, ("01", "02"): 5, ("02", "01"): 0, ("02", "02"): 1,
              ("03", "01"): 7, ("03", "02"): 7, ("04", "01"): 3}
    volumes = {k: 10.0 * v + 1 for k, v in counts.items()}
    for (sub, ses), n in counts.items():
        rows.append({"participant_id": f"sub-{sub}", "session_id": f"ses-{ses}",
                     "prefix": f"sub-{sub}_ses-{ses}", "sequence": "MP2RAGE",
                     "lesion_count": n, "total_volume_ul": volumes[(sub, ses)],
                     "median_volume_ul": np.nan if n == 0 else 5.0})
    table = pd.DataFrame(rows)
    participants = pd.DataFrame({"participant_id": ["sub-01", "sub-02", "sub-03", "sub-04"],
                                 "age": [30, 40, 50, 60], "site": ["A", "A", "B", None]})
    return table.merge(participants, on="participant_id", how="left")


def test_describe_matches_numpy() -> None:
    values = [1, 2, 3, 4, 100, None, np.nan]
    d = describe(values)
    arr = np.array([1, 2, 3, 4, 100], float)
    assert d["n"] == 5
    assert d["mean"] == pytest.approx(arr.mean())
    assert d["sd"] == pytest.approx(arr.std(ddof=1))
    assert d["median"] == 3 and d["q1"] == 2 and d["q3"] == 4
    assert (d["min"], d["max"]) == (1, 100)
    empty = describe([])
    assert empty["n"] == 0 and np.isnan(empty["mean"])
    assert np.isnan(describe([5])["sd"])


def test_descriptive_overall_and_by_group() -> None:
    table = _images()
    out = descriptive_stats(table, ["session_id", "site"])
    overall = out[(out.measure == "lesion_count") & (out.group_by == "all")].iloc[0]
    assert overall.n_images == 7 and overall.n_participants == 4
    assert overall["mean"] == pytest.approx(np.mean([2, 5, 0, 1, 7, 7, 3]))
    by_site = out[(out.measure == "lesion_count") & (out.group_by == "site")].set_index("group")
    # sub-04 has no site: left out of the grouping, not a "nan" level.
    assert list(by_site.index) == ["A", "B"]
    assert by_site.loc["A", "n_images"] == 4 and by_site.loc["A", "n_participants"] == 2
    assert by_site.loc["B", "median"] == 7
    by_ses = out[(out.measure == "total_volume_ul") & (out.group_by == "session_id")]
    assert list(by_ses["group"]) == ["ses-01", "ses-02"]
    assert list(by_ses["n_images"]) == [4, 3]
    # median_volume_ul is n/a for the image without lesions: n counts finite values only.
    med = out[(out.measure == "median_volume_ul") & (out.group_by == "all")].iloc[0]
    assert med.n_images == 6


def test_descriptive_natural_level_order() -> None:
    table = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3"],
                          "session_id": ["ses-10", "ses-2", "ses-1"],
                          "lesion_count": [1, 2, 3]})
    out = descriptive_stats(table, ["session_id"], measures=["lesion_count"])
    assert list(out.loc[out.group_by == "session_id", "group"]) == ["ses-1", "ses-2", "ses-10"]


def test_classify_columns() -> None:
    participants = pd.DataFrame({
        "participant_id": [f"sub-{i:02d}" for i in range(1, 9)],
        "age": [20, 30, 40, 50, 60, 70, 80, 90],
        "sex": list("FMFMFMFM"),
        "group": [0, 1, 0, 1, 0, 1, 0, 1],           # numbers, but the sidecar says levels
        "edss": [1.0, 2.5, None, 3.0, 4.0, 6.5, 2.0, 1.5],
        "notes": [f"free text {i}" for i in range(8)],  # one value per participant: skipped
        "empty": [None] * 8,
    })
    sidecar = {"group": {"Levels": {"0": "control", "1": "patient"}}}
    categorical, numeric = classify_columns(participants, sidecar)
    assert categorical == ["sex", "group"]
    assert numeric == ["age", "edss"]


def test_spearman_against_scipy_and_edge_cases() -> None:
    x = [1, 2, 3, 4, 5, 6]
    y = [2, 1, 4, 3, 6, 5]
    n, rho, p, note = spearman(x, y)
    ref = sps.spearmanr(x, y)
    assert n == 6 and note == ""
    assert rho == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert spearman([1, 2], [3, 4])[3] == "fewer than 3 observations"
    n, rho, _, note = spearman([1, 2, 3, np.nan], [5, 5, 5, 1])
    assert n == 3 and np.isnan(rho) and note == "constant values"


def test_correlations_one_observation_per_participant() -> None:
    table = _images()
    # A second target of sub-01 ses-01 (another run): averaged, not counted twice.
    extra = table.iloc[[0]].copy()
    extra["prefix"] = "sub-01_ses-01_run-2"
    extra["lesion_count"] = 4
    table = pd.concat([table, extra], ignore_index=True)
    out = correlation_stats(table, ["age"], measures=["lesion_count"])
    ses1 = out[out.session_id == "ses-01"].iloc[0]
    assert ses1.n == 4
    expected = sps.spearmanr([30, 40, 50, 60], [3.0, 0, 7, 3]).statistic  # sub-01: mean(2, 4)
    assert ses1.rho == pytest.approx(expected)
    ses2 = out[out.session_id == "ses-02"].iloc[0]
    assert ses2.n == 3
    assert ses2.rho == pytest.approx(sps.spearmanr([30, 40, 50], [5, 1, 7]).statistic)


def test_correlations_without_sessions() -> None:
    table = _images().query("session_id == 'ses-01'").assign(session_id=None)
    out = correlation_stats(table, ["age"], measures=["total_volume_ul"])
    assert list(out.session_id) == ["n/a"] and out.iloc[0].n == 4


def test_longitudinal_changes() -> None:
    table = _images()
    out = longitudinal_changes(table)
    assert list(out.participant_id) == ["sub-01", "sub-02", "sub-03"]  # sub-04: one session
    row = out.set_index("participant_id").loc["sub-01"]
    assert (row.session_from, row.session_to) == ("ses-01", "ses-02")
    assert row.lesion_count_delta == 3
    assert row.total_volume_ul_delta == pytest.approx(30.0)
    assert row.total_volume_ul_pct_change == pytest.approx(100 * 30 / 21)
    assert out.set_index("participant_id").loc["sub-03", "lesion_count_delta"] == 0


def test_longitudinal_orders_sessions_and_separates_lines() -> None:
    table = pd.DataFrame({
        "participant_id": ["sub-01"] * 5,
        "session_id": ["ses-10", "ses-2", "ses-1", "ses-1", "ses-2"],
        "prefix": ["sub-01_ses-10", "sub-01_ses-2", "sub-01_ses-1",
                   "sub-01_ses-1_acq-UNIT1", "sub-01_ses-2_acq-UNIT1"],
        "lesion_count": [9, 4, 1, 0, 2], "total_volume_ul": [90.0, 40, 10, 0, 20],
    })
    out = longitudinal_changes(table)
    assert list(zip(out.line, out.session_from, out.session_to, strict=True)) == [
        ("sub-01", "ses-1", "ses-2"), ("sub-01", "ses-2", "ses-10"),
        ("sub-01_acq-UNIT1", "ses-1", "ses-2")]
    assert list(out.lesion_count_delta) == [3, 5, 2]
    # Volume change from zero has no percentage.
    assert np.isnan(out.iloc[2].total_volume_ul_pct_change)


def test_longitudinal_without_sessions_is_empty() -> None:
    table = pd.DataFrame({"participant_id": ["sub-01"], "session_id": [None],
                          "prefix": ["sub-01"], "lesion_count": [1], "total_volume_ul": [1.0]})
    assert longitudinal_changes(table).empty
    assert target_line("sub-01_ses-02_acq-UNIT1") == "sub-01_acq-UNIT1"
