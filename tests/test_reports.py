"""Participant reports on the derivatives of a real participant run on tiny phantoms
(tests/derivatives_fixture.py), incl. a real headless-Chromium render check."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from derivatives_fixture import CONTAINER, MODEL_NAME, MODEL_WARNING, SPACE, TRAINER, Derivatives

from bids_cl.derivatives import writer
from bids_cl.derivatives.reader import collect_targets, latest_run_dir, participant_status
from bids_cl.reports import generate_participant_report, generate_reports
from bids_cl.reports.browser import find_chromium, render_check
from bids_cl.reports.figures import lesion_crops
from bids_cl.utils.bids import WorkItem

needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="chromium not installed")


@pytest.fixture(scope="module")
def built(real_derivatives: Derivatives, tmp_path_factory: pytest.TempPathFactory) -> Derivatives:
    ds = real_derivatives.copy_output(tmp_path_factory.mktemp("reports"))
    written = generate_reports(ds.out_dir, templates=ds.templates, template_lookup=False)
    assert [p.name for p in written] == ["sub-01.html", "sub-02.html", "sub-03.html",
                                         "sub-04.html"]
    return ds


def _html(ds: Derivatives, label: str) -> str:
    return (ds.out_dir / f"sub-{label}.html").read_text(encoding="utf-8")


def _lesion_rows(page: str, prefix: str) -> int:
    match = re.search(rf'data-rows-key="lesions:{prefix}"><thead>.*?</thead><tbody>(.*?)</tbody>',
                      page, re.S)
    assert match, f"no lesion table for {prefix}"
    return match.group(1).count("<tr>")


def test_figures_have_bids_like_names(built: Derivatives) -> None:
    figures = sorted(p.name for p in (built.out_dir / "sub-01" / "figures").iterdir())
    assert figures == sorted(
        f"sub-01_ses-0{s}_{kind}" for s in (1, 2) for kind in (
            "desc-brainmask_T1w.png", "desc-lesions_T1w.png",
            f"space-{SPACE}_desc-reg_T1w.png"))
    # No lesion in sub-03 ses-01: no lesion mosaic; every other target has one.
    sub3 = {p.name for p in (built.out_dir / "sub-03" / "figures").iterdir()}
    assert "sub-03_ses-01_desc-lesions_T1w.png" not in sub3
    assert "sub-03_ses-02_desc-lesions_T1w.png" in sub3
    # Modest size: a screening figure, not a print figure.
    for png in (built.out_dir / "sub-01" / "figures").glob("*.png"):
        assert png.stat().st_size < 600_000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lesions_found_by_position(built: Derivatives) -> None:
    anat = built.out_dir / "sub-02" / "ses-02" / "anat"
    prefix = "sub-02_ses-02"
    table = pd.read_csv(anat / f"{prefix}_label-CL_desc-lesions_stats.tsv", sep="\t")
    # Another engine may number lesions differently: matching must not rely on the ids.
    table["lesion_id"] = table["lesion_id"].to_numpy()[::-1]
    crops = lesion_crops(anat / f"{prefix}_desc-preproc_T1w.nii.gz",
                         anat / f"{prefix}_label-CL_mask.nii.gz", table)
    assert len(crops) == len(table) == built.counts[prefix]
    for crop in crops:
        assert crop.label > 0
        assert int(crop.lesion.sum()) == int(crop.row["voxels"])
        assert crop.lesion.shape == crop.background.shape
    assert len({c.label for c in crops}) == len(crops)


def test_report_content(built: Derivatives) -> None:
    page = _html(built, "02")
    for prefix in ("sub-02_ses-01", "sub-02_ses-02"):
        assert f'<section id="{prefix}">' in page
        assert _lesion_rows(page, prefix) == built.counts[prefix]
        assert f"sub-02/figures/{prefix}_desc-lesions_T1w.png" in page
    # Provenance from the summary JSON: model warning, OOD warning, strategy, timings, versions.
    # One model banner per section, not repeated as an engine warning (the summary lists it among its
    # warnings); the engine's other warnings (here: the unknown trainer class) are kept.
    assert page.count(f"<b>Model:</b> {html.escape(MODEL_WARNING)}") == 2
    assert f"<b>Warning:</b> {html.escape(MODEL_WARNING)}" not in page
    assert page.count(f"<b>Warning:</b> trainer class {TRAINER}") == 2
    # The OOD warning of ses-02 once, in its own box (the summary's Warnings repeat it).
    ood = json.loads((built.out_dir / "sub-02" / "ses-02" / "anat" /
                      "sub-02_ses-02_label-CL_desc-summary_stats.json").read_text())["OODWarning"]
    assert ood and built.ood_prefix == "sub-02_ses-02"
    assert page.count(f"<b>Out of distribution:</b> {html.escape(ood)}") == 1
    assert page.count(html.escape(ood)) == 1
    assert "skull-strip strategy <b>none</b>" in page and MODEL_NAME in page
    # Timings from the run's log/<run>/timings.json, per stage.
    for prefix in ("sub-02_ses-01", "sub-02_ses-02"):
        assert f'data-rows-key="timings:{prefix}"' in page
    assert "<td>skullstrip</td>" in page and "<td>segment</td>" in page
    assert f"<td>register_{SPACE}</td>" in page
    assert CONTAINER in page  # container from dataset_description.json
    assert "No crash file." in page
    # Offline: nothing fetched from the network, no absolute file paths in src attributes.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert not re.search(r'src="/', page)
    assert len(page.encode()) < 200_000


def test_raw_image_missing_falls_back_to_preproc(built: Derivatives) -> None:
    page = _html(built, "03")
    assert "skull-stripped image (sub-03_ses-02_desc-preproc_T1w.nii.gz)" in page
    assert "No lesion detected." in page
    # No lesion, no median volume (the summary JSON writes 0): n/a, as in group_lesions.tsv.
    summary = re.search(r'data-rows-key="summary">.*?</table>', page, re.S).group(0)
    row = re.search(r'<tr><td>01</td>.*?</tr>', summary).group(0)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", row)[-3:] == ["0.0", "n/a", "2"]
    assert 'data-rows-key="timings:sub-03_ses-01"' in page
    assert _lesion_rows(page, "sub-03_ses-01") == 0


def test_registration_variants(built: Derivatives, tmp_path: Path) -> None:
    assert "GM/WM edges" in _html(built, "01")          # warped T1w present (the writer writes it)
    # Without the warped T1w (e.g. deleted to save space) only the lesion mask in template space.
    out = tmp_path / "out"
    shutil.copytree(built.out_dir / "sub-02", out / "sub-02")
    warped = sorted(out.glob(f"sub-02/ses-*/anat/*_space-{SPACE}_desc-preproc_T1w.*"))
    assert len(warped) == 4
    for path in warped:
        path.unlink()
    page = generate_participant_report(out, "02", templates=built.templates,
                                       template_lookup=False).read_text(encoding="utf-8")
    assert "warped T1w is not" in page and "GM/WM edges" not in page


def test_failed_participant_report(built: Derivatives) -> None:
    page = _html(built, "04")
    assert 'status-failed">failed' in page
    # One line per failed target: discovery refused ses-01, the skull strip refused ses-02.
    assert "3-D" in built.reasons["sub-04_ses-01"]
    assert "not skull-stripped" in built.reasons["sub-04_ses-02"]
    for prefix, reason in built.reasons.items():
        assert f"<b>{html.escape(f'{prefix}: {reason} (exit 65)')}</b>" in page
    status = participant_status(built.out_dir, "sub-04")
    assert status.status == "failed" and len(status.crash_files) == 2


def test_crash_text_is_escaped(built: Derivatives, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(built.out_dir / "sub-04", out / "sub-04")
    log = latest_run_dir(out, "04")
    writer.write_crash_note(log, "sub-04_ses-01", "unexpected ValueError: <with brackets & ampersand>",
                            1, [])
    page = generate_participant_report(out, "04", template_lookup=False).read_text(encoding="utf-8")
    # Crash text is escaped, not interpreted as HTML.
    assert "&lt;with brackets &amp; ampersand&gt;" in page
    assert "<with brackets" not in page


def test_cap_on_lesions_shown(built: Derivatives, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(built.out_dir / "sub-02", out / "sub-02")
    generate_participant_report(out, "sub-02", template_lookup=False, max_lesions=3)
    page = (out / "sub-02.html").read_text(encoding="utf-8")
    assert f"Showing the 3 largest of {built.counts['sub-02_ses-02']} lesions" in page
    assert _lesion_rows(page, "sub-02_ses-02") == built.counts["sub-02_ses-02"]
    # No template available here (lookup off): a note instead of the registration figure.
    assert f"Template {SPACE} is not available here" in page


def test_rerun_overwrites_atomically(built: Derivatives, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(built.out_dir / "sub-03", out / "sub-03")
    first = generate_participant_report(out, "03", template_lookup=False)
    before = {p.name: p.read_bytes() for p in (out / "sub-03" / "figures").iterdir()}
    second = generate_participant_report(out, "03", template_lookup=False)
    assert first == second
    after = {p.name: p.read_bytes() for p in (out / "sub-03" / "figures").iterdir()}
    assert before == after  # deterministic figures
    leftovers = [p for p in out.rglob(".*") if p.is_file()]
    assert leftovers == []  # no temporary files left behind


def test_partial_and_stale_crash_status(built: Derivatives, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(built.out_dir / "sub-01", out / "sub-01")
    log = latest_run_dir(out, "01")
    assert log is not None and log.name == built.run_uuid
    targets = collect_targets(out, "01")
    newest = max(t.summary_path.stat().st_mtime for t in targets)
    # A crash note of an earlier run, older than the outputs.
    earlier = out / "sub-01" / "log" / "20000101-000000_00000000"
    crash = writer.write_crash_note(earlier, "sub-01_ses-02", "earlier failure", 1, [])
    os.utime(crash, (newest - 100, newest - 100))
    os.utime(earlier, (newest - 100, newest - 100))
    assert participant_status(out, "01").status == "ok"  # stale crash of an earlier run
    # The latest run also planned a third session, which left no outputs.
    items = [WorkItem.from_dict(i) for i in json.loads((log / "discovery.json").read_text())]
    third = dataclasses.replace(items[-1], session="03", prefix="sub-01_ses-03",
                                target=items[-1].target.replace("ses-02", "ses-03"))
    writer.write_participant_log(out, "01", log.name, config_toml=(log / "bids_cl.toml").read_text(),
                                 items=[*items, third])
    status = participant_status(out, "01")
    assert status.status == "partial" and status.missing_targets == ["sub-01_ses-03"]


def test_missing_participant_report(tmp_path: Path) -> None:
    page = generate_participant_report(tmp_path, "07").read_text(encoding="utf-8")
    assert "No segmentation outputs for this participant." in page
    assert participant_status(tmp_path, "07").status == "missing"


@pytest.mark.browser
@needs_chromium
def test_participant_reports_render_in_chromium(built: Derivatives) -> None:
    for label in ("01", "02", "03"):
        result = render_check(built.out_dir / f"sub-{label}.html")
        assert result["errors"] == [] and result["console"] == []
        assert result["broken"] == []
        assert result["images"] >= 4 and result["imagesOk"] == result["images"]
        for prefix, count in built.counts.items():
            if prefix.startswith(f"sub-{label}_"):
                assert result["tables"][f"lesions:{prefix}"] == count
    failed = render_check(built.out_dir / "sub-04.html")
    assert failed["errors"] == [] and failed["console"] == [] and failed["images"] == 0


@pytest.mark.browser
@needs_chromium
def test_render_check_catches_broken_images(built: Derivatives) -> None:
    # Negative control: the check must notice a missing figure and a script error.
    page = _html(built, "01").replace("sub-01/figures/sub-01_ses-01_desc-lesions_T1w.png",
                                      "sub-01/figures/does-not-exist.png")
    page = page.replace("</main>", "<script>undefinedFunction();</script></main>")
    broken = built.out_dir / "broken-copy.html"
    broken.write_text(page, encoding="utf-8")
    try:
        result = render_check(broken)
    finally:
        broken.unlink()
    assert result["broken"] == ["sub-01/figures/does-not-exist.png"]
    assert result["imagesOk"] == result["images"] - 1
    assert any("undefinedFunction" in e for e in result["errors"])


def test_report_names_where_the_threshold_came_from() -> None:
    from bids_cl.reports.participant import _threshold_text

    assert _threshold_text({"Threshold": 0.9, "ThresholdSource": "model"}) == \
        "0.9 (the model's, tuned on its validation split)"
    assert _threshold_text({"Threshold": 0.4, "ThresholdSource": "user"}) == "0.4 (--threshold)"
    assert _threshold_text({"Threshold": 0.5}) == 0.5  # derivatives from before the source was recorded


def test_report_names_where_the_minimum_lesion_size_came_from() -> None:
    from bids_cl.reports.participant import _min_size_text

    assert _min_size_text({"MinLesionSize": "80uL", "MinLesionSizeVoxels": 10,
                           "MinLesionSizeSource": "model"}) == \
        "80uL = 10 voxels (the model's, tuned on its validation split)"
    assert _min_size_text({"MinLesionSize": 3, "MinLesionSizeVoxels": 3, "MinLesionSizeSource": "user"}) == \
        "3 (--min-lesion-size)"
    assert _min_size_text({"MinLesionSize": None, "MinLesionSizeSource": "default"}) == \
        "none (every lesion kept)"
