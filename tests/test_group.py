"""The group level on the derivatives of a real participant run on tiny phantoms
(tests/derivatives_fixture.py): 4 participants x 2 sessions planned, sub-04 failed (crash notes, no
outputs), sub-05 in participants.tsv but never processed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from derivatives_fixture import MODEL_NAME, MODEL_WARNING, SPACE, Derivatives

from bids_cl.group import GroupResult, run_group_level
from bids_cl.reports.browser import find_chromium, render_check

needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="chromium not installed")


@pytest.fixture(scope="module")
def built(real_derivatives: Derivatives, tmp_path_factory: pytest.TempPathFactory) -> Derivatives:
    ds = real_derivatives.copy_output(tmp_path_factory.mktemp("group"))
    # group.html only links to the participant reports: stand-ins keep this module fast
    # (the reports themselves are tested in test_reports.py).
    for label in (*ds.ok, *ds.failed):
        (ds.out_dir / f"sub-{label}.html").write_text("<!DOCTYPE html><title>r</title>\n")
    return ds


@pytest.fixture(scope="module")
def result(built: Derivatives) -> GroupResult:
    return run_group_level(built.bids_dir, built.out_dir, templates=built.templates,
                           template_lookup=False)


def _tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


def test_counts_equal_participant_summaries(built: Derivatives, result: GroupResult) -> None:
    table = _tsv(built.out_dir / "group_lesions.tsv")
    assert sorted(table["prefix"]) == sorted(built.counts)
    for row in table.itertuples():
        sub, ses = row.participant_id, row.session_id
        anat = built.out_dir / sub / ses / "anat"
        summary = json.loads((anat / f"{row.prefix}_label-CL_desc-summary_stats.json").read_text())
        lesions = _tsv(anat / f"{row.prefix}_label-CL_desc-lesions_stats.tsv")
        assert row.lesion_count == summary["LesionCount"] == len(lesions)
        assert row.total_volume_ul == pytest.approx(summary["TotalVolume_uL"])
        assert row.total_volume_ul == pytest.approx(lesions["volume_ul"].sum())
        assert row.sequence == summary["Sequence"]
        assert row.model_name == MODEL_NAME
        # No lesion, no median volume: n/a (the summary writes 0), as the data dictionary says.
        if row.lesion_count == 0:
            assert np.isnan(row.median_volume_ul)
        else:
            assert row.median_volume_ul == pytest.approx(lesions["volume_ul"].median())
    per_lesion = _tsv(built.out_dir / "group_lesions_per-lesion.tsv")
    assert len(per_lesion) == sum(built.counts.values())
    assert per_lesion.groupby("prefix").size().to_dict() == {
        p: n for p, n in built.counts.items() if n}
    assert list(per_lesion.columns[:4]) == ["participant_id", "session_id", "prefix", "lesion_id"]


def test_participants_tsv_joined_with_dictionary(built: Derivatives) -> None:
    table = _tsv(built.out_dir / "group_lesions.tsv")
    assert {"age", "sex", "site", "diagnosis"} <= set(table.columns)
    assert table.set_index("prefix").loc["sub-02_ses-01", "age"] == 51
    sidecar = json.loads((built.out_dir / "group_lesions.json").read_text())
    assert set(sidecar) == set(table.columns)
    assert sidecar["total_volume_ul"]["Units"] == "uL"
    assert sidecar["age"]["Units"] == "year"  # copied from participants.json
    assert sidecar["ood_warning"]["Description"]
    ood = table.set_index("prefix")["ood_warning"]
    summary = json.loads((built.out_dir / "sub-02" / "ses-02" / "anat" /
                          f"{built.ood_prefix}_label-CL_desc-summary_stats.json").read_text())
    assert ood.notna().sum() == 1 and ood[built.ood_prefix] == summary["OODWarning"]
    assert "median brain intensity" in ood[built.ood_prefix]


def test_failed_and_missing_are_listed(built: Derivatives, result: GroupResult) -> None:
    status = _tsv(built.out_dir / "group_status.tsv").set_index("participant_id")
    assert status["status"].to_dict() == {"sub-01": "ok", "sub-02": "ok", "sub-03": "ok",
                                          "sub-04": "failed", "sub-05": "missing"}
    assert status.loc["sub-04", "reason"].startswith("sub-04_ses-0")
    for prefix, reason in built.reasons.items():  # each failed target's one-line reason
        assert f"{prefix}: {reason} (exit 65)" in status.loc["sub-04", "reason"]
    assert result.failed == ["sub-04"] and result.missing == ["sub-05"]
    page = (built.out_dir / "group.html").read_text(encoding="utf-8")
    assert "sub-04 (failed)" in page and "sub-05 (missing)" in page


def test_statistics_files(built: Derivatives, result: GroupResult) -> None:
    desc = _tsv(built.out_dir / "group_desc-descriptive_stats.tsv")
    assert {"all", "session_id", "sequence", "field_strength", "sex", "site", "diagnosis"} <= \
        set(desc["group_by"])
    overall = desc[(desc.measure == "lesion_count") & (desc.group_by == "all")].iloc[0]
    assert overall.n_images == 6 and overall.n_participants == 3
    assert overall["mean"] == pytest.approx(np.mean(list(built.counts.values())))
    corr = _tsv(built.out_dir / "group_desc-correlations_stats.tsv")
    assert set(corr["covariate"]) == {"age"}
    assert {"n", "rho", "p_value"} <= set(corr.columns)
    longi = _tsv(built.out_dir / "group_desc-longitudinal_stats.tsv").set_index("participant_id")
    assert list(longi.index) == ["sub-01", "sub-02", "sub-03"]
    assert longi.loc["sub-01", "lesion_count_delta"] == \
        built.counts["sub-01_ses-02"] - built.counts["sub-01_ses-01"]


def test_plots_png_and_svg(built: Derivatives, result: GroupResult) -> None:
    names = {p.name for p in (built.out_dir / "figures").iterdir()}
    for stem in ("distributions", "bySex", "bySite", "byDiagnosis", "bySequence",
                 "byFieldStrength", "trajectories"):
        assert f"group_desc-{stem}_plot.png" in names
        assert f"group_desc-{stem}_plot.svg" in names
    assert f"group_space-{SPACE}_desc-frequency_plot.png" in names
    assert result.warnings == []


def test_frequency_map_one_vote_per_session(built: Derivatives, result: GroupResult) -> None:
    path = built.out_dir / f"group_space-{SPACE}_desc-frequency_probseg.nii.gz"
    assert result.frequency_maps == {SPACE: path}
    freq = np.asarray(nib.load(str(path)).dataobj)
    masks = sorted(built.out_dir.glob(f"sub-*/ses-*/anat/*_space-{SPACE}_label-CL_mask.nii.gz"))
    assert len(masks) == 6
    expected = np.mean([np.asarray(nib.load(str(m)).dataobj) > 0 for m in masks], axis=0)
    np.testing.assert_allclose(freq, expected, atol=1e-6)
    meta = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    assert meta["NumberOfVotes"] == 6 and meta["NumberOfParticipants"] == 3
    assert meta["VotingUnit"] == "participant-session"


def test_frequency_map_merges_targets_of_a_session(built: Derivatives, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(built.out_dir / "sub-01", out / "sub-01")
    anat = out / "sub-01" / "ses-01" / "anat"
    # A second target in the same session (acq-UNIT1 copy, lesions shifted): still one vote.
    for src in anat.glob("sub-01_ses-01_*"):
        dst = anat / src.name.replace("sub-01_ses-01_", "sub-01_ses-01_acq-UNIT1_")
        shutil.copy(src, dst)
    shifted = anat / f"sub-01_ses-01_acq-UNIT1_space-{SPACE}_label-CL_mask.nii.gz"
    img = nib.load(str(shifted))
    nib.save(nib.Nifti1Image(np.roll(np.asarray(img.dataobj), 3, axis=2), img.affine), str(shifted))
    res = run_group_level(None, out, template_lookup=False)
    assert len(res.images) == 3
    meta = json.loads((out / f"group_space-{SPACE}_desc-frequency_probseg.json").read_text())
    assert meta["NumberOfVotes"] == 2 and len(meta["Sources"]) == 3
    freq = np.asarray(nib.load(str(res.frequency_maps[SPACE])).dataobj)
    assert set(np.unique(freq)) <= {0.0, 0.5, 1.0}


def test_group_html_links_and_tables(built: Derivatives, result: GroupResult) -> None:
    page = result.html.read_text(encoding="utf-8")
    assert '<a href="sub-01.html#sub-01_ses-01">sub-01_ses-01</a>' in page
    assert '<a href="sub-04.html">sub-04</a>' in page      # failed: its report shows the crash
    assert 'href="sub-05.html"' not in page                # missing: no report to link
    assert MODEL_WARNING in page
    rows = re.search(r'data-rows-key="images"><thead>.*?</thead><tbody>(.*?)</tbody>', page, re.S)
    assert rows and rows.group(1).count("<tr>") == 6
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_rerun_and_participant_selection(built: Derivatives, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for label in ("02", "04"):
        shutil.copytree(built.out_dir / f"sub-{label}", out / f"sub-{label}")
    first = run_group_level(built.bids_dir, out, participant_labels=["sub-02", "04"],
                            template_lookup=False)
    tsv = (out / "group_lesions.tsv").read_bytes()
    second = run_group_level(built.bids_dir, out, participant_labels=["sub-02", "04"],
                             template_lookup=False)
    assert (out / "group_lesions.tsv").read_bytes() == tsv  # rerun overwrites, same content
    assert [p for p in out.rglob(".*") if p.is_file()] == []  # no temp files left
    assert list(first.status["participant_id"]) == list(second.status["participant_id"]) == [
        "sub-02", "sub-04"]  # sub-01/03/05 of participants.tsv not selected
    assert set(second.images["participant_id"]) == {"sub-02"}
    assert second.failed == ["sub-04"]
    # Frequency map without a template: still drawn (black background).
    assert (out / "figures" / f"group_space-{SPACE}_desc-frequency_plot.png").exists()


def test_group_without_any_output(tmp_path: Path) -> None:
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\n")
    res = run_group_level(tmp_path / "bids", tmp_path / "out", template_lookup=False)
    assert res.n_images == 0 and res.missing == ["sub-01"]
    assert _tsv(tmp_path / "out" / "group_lesions.tsv").empty
    assert "1 missing" in res.html.read_text(encoding="utf-8")


@pytest.mark.browser
@needs_chromium
def test_group_html_renders_in_chromium(built: Derivatives, result: GroupResult) -> None:
    check = render_check(result.html)
    assert check["errors"] == [] and check["console"] == [] and check["broken"] == []
    assert check["images"] >= 8 and check["imagesOk"] == check["images"]
    assert check["tables"]["images"] == 6
    assert check["tables"]["status"] == 5
