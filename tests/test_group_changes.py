"""Group tables of lesion change: new and enlarging CLs per participant and pair of sessions, the
annualised new-lesion rate from sessions.tsv, and the change columns in the group statistics.

Change summaries are written by the real writer (``writer.write_change_derivatives``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_cl.derivatives import spec, writer
from bids_cl.group import run_group_level
from bids_cl.group.changes import (
    annual_rate,
    change_table,
    read_session_dates,
    with_change_columns,
    years_between,
)
from bids_cl.group.stats import LONGITUDINAL_COLUMNS
from bids_cl.utils.bids import WorkItem


def item(participant: str, session: str) -> WorkItem:
    prefix = f"sub-{participant}_ses-{session}"
    return WorkItem(participant=participant, session=session, target=f"/data/{prefix}_UNIT1.nii.gz",
                    target_suffix="UNIT1", entities={"subject": participant, "session": session},
                    prefix=prefix, sequence="MP2RAGE")


def write_change(out: Path, participant: str, earlier: str, later: str, counts: list[int] | None,
                 refused: str | None = None) -> None:
    keys = ["New", "Enlarging", "Stable", "Shrinking", "Disappeared"]
    summary = {**dict(zip(keys, counts or [None] * 5, strict=True)),
               "NetVolumeChange_uL": 12.5, "AlignmentQuality": 0.3 if refused else 0.97,
               "AlignmentAccepted": refused is None, "Rules": {"min_alignment": 0.5},
               "Earlier": f"sub-{participant}_ses-{earlier}",
               "Later": f"sub-{participant}_ses-{later}", "Refused": refused}
    writer.write_change_derivatives(out, item(participant, later), earlier, table=None, dseg=None,
                                    summary=summary, sources=[])


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    bids, out = tmp_path / "bids", tmp_path / "out"
    (bids / "sub-01").mkdir(parents=True)
    (bids / "sub-02").mkdir(parents=True)
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-01\t40\nsub-02\t35\n")
    # sub-01: dated visits (one without the ses- prefix, as some datasets write them)
    (bids / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\nses-01\t2020-01-15T09:00:00\n02\t2020-07-15T09:00:00\n"
        "ses-03\t2022-01-15T09:00:00\n")
    write_change(out, "01", "01", "02", [2, 1, 4, 0, 1])
    write_change(out, "01", "02", "03", [1, 0, 6, 1, 0])
    write_change(out, "01", "01", "03", [3, 1, 4, 1, 1])
    write_change(out, "02", "01", "02", None, refused="alignment is poor")
    return bids, out


def test_session_dates_and_rates(tmp_path: Path) -> None:
    sub = tmp_path / "sub-07"
    sub.mkdir()
    (sub / "sub-07_sessions.tsv").write_text(
        "session_id\tacq_time\nses-a\t2021-03-01\nses-b\tn/a\nses-c\tnot a date\n")
    dates = read_session_dates(tmp_path, "07")
    assert list(dates) == ["ses-a"] and dates["ses-a"] == pd.Timestamp("2021-03-01")
    assert read_session_dates(tmp_path, "sub-08") == {} and read_session_dates(None, "07") == {}
    (sub / "sub-07_sessions.tsv").write_text("session_id\tage\nses-a\t30\n")
    assert read_session_dates(tmp_path, "07") == {}  # no acq_time column

    one_year = years_between(pd.Timestamp("2020-01-01"), pd.Timestamp("2021-01-01"))
    assert one_year == pytest.approx(366 / 365.25)
    assert np.isnan(years_between(None, pd.Timestamp("2021-01-01")))
    assert annual_rate(3, 1.5) == pytest.approx(2.0)
    for count, years in ((3, 0.0), (3, np.nan), (np.nan, 1.0), (None, 1.0)):
        assert np.isnan(annual_rate(count, years))


def test_change_table_per_participant_and_pair(folders: tuple[Path, Path]) -> None:
    bids, out = folders
    table = change_table(out, ["01", "02"], bids)
    assert list(table[["participant_id", "session_from", "session_to"]].itertuples(
        index=False, name=None)) == [("sub-01", "ses-01", "ses-02"), ("sub-01", "ses-01", "ses-03"),
                                     ("sub-01", "ses-02", "ses-03"), ("sub-02", "ses-01", "ses-02")]
    first = table.iloc[0]
    assert (first["new_cl"], first["enlarging_cl"], first["disappeared_cl"]) == (2, 1, 1)
    assert first["line"] == "sub-01" and first["later"] == "sub-01_ses-02"
    half_year = years_between(pd.Timestamp("2020-01-15T09:00"), pd.Timestamp("2020-07-15T09:00"))
    assert first["years"] == pytest.approx(half_year)
    assert first["new_cl_per_year"] == pytest.approx(2 / half_year)
    whole = table.iloc[1]
    assert whole["new_cl_per_year"] == pytest.approx(3 / years_between(
        pd.Timestamp("2020-01-15T09:00"), pd.Timestamp("2022-01-15T09:00")))
    refused = table.iloc[3]
    assert refused["refused"] == "alignment is poor" and pd.isna(refused["new_cl"])
    assert pd.isna(refused["years"]) and pd.isna(refused["new_cl_per_year"])  # no sessions.tsv


def test_longitudinal_statistics_gain_the_change_columns() -> None:
    longitudinal = pd.DataFrame([
        {"participant_id": "sub-01", "line": "sub-01", "session_from": "ses-01",
         "session_to": "ses-02", "lesion_count_from": 3, "lesion_count_to": 5},
        {"participant_id": "sub-03", "line": "sub-03", "session_from": "ses-01",
         "session_to": "ses-02", "lesion_count_from": 1, "lesion_count_to": 1},
    ]).reindex(columns=LONGITUDINAL_COLUMNS)
    changes = pd.DataFrame([{"participant_id": "sub-01", "line": "sub-01", "session_from": "ses-01",
                             "session_to": "ses-02", "new_cl": 2, "enlarging_cl": 1,
                             "shrinking_cl": 0, "disappeared_cl": 0, "years": 0.5,
                             "new_cl_per_year": 4.0}])
    merged = with_change_columns(longitudinal, changes).set_index("participant_id")
    assert merged.loc["sub-01", "new_cl"] == 2 and merged.loc["sub-01", "new_cl_per_year"] == 4.0
    assert pd.isna(merged.loc["sub-03", "new_cl"])  # no change output for that pair
    empty = with_change_columns(longitudinal, pd.DataFrame())
    assert "new_cl_per_year" in empty.columns and empty["new_cl"].isna().all()


def test_group_level_writes_the_change_table(folders: tuple[Path, Path]) -> None:
    bids, out = folders
    result = run_group_level(bids, out, template_lookup=False)
    path = out / "group_desc-change_stats.tsv"
    assert result.files["change"] == path and path.is_file()
    written = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    assert len(written) == 4 and written["new_cl"].tolist()[:3] == [2, 3, 1]
    assert written["refused"].isna().tolist() == [True, True, True, False]
    dictionary = json.loads((out / "group_desc-change_stats.json").read_text())
    assert set(dictionary) == set(written.columns)
    assert dictionary["new_cl_per_year"]["Units"] == "lesions/year"
    # the change measures are in the descriptive statistics (one observation per pair)
    descriptive = result.descriptive
    new = descriptive[(descriptive["measure"] == "new_cl") & (descriptive["group_by"] == "all")]
    assert new["n_images"].tolist() == [3] and new["mean"].tolist() == [pytest.approx(2.0)]
    rate = descriptive[(descriptive["measure"] == "new_cl_per_year")
                       & (descriptive["group_by"] == "all")]
    assert rate["n_images"].tolist() == [3]
    html = result.html.read_text()
    assert 'id="changes"' in html and "group_desc-change_stats.tsv" in html
    assert "alignment is poor" in html
    # the group tables only read: the participant outputs are left as they were
    assert (out / spec.anat_dir("01", "02") / spec.change_name(
        "sub-01_ses-02", "change_summary", earlier="01")).is_file()


def test_group_level_without_change_outputs_writes_an_empty_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run_group_level(None, out, template_lookup=False)
    written = pd.read_csv(out / "group_desc-change_stats.tsv", sep="\t")
    assert written.empty and list(written.columns)[:4] == ["participant_id", "line",
                                                           "session_from", "session_to"]
    assert 'id="changes"' not in result.html.read_text()
