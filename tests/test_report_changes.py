"""The participant report's change section, on derivatives of a real participant run.

The fixture: the shared real derivatives (tests/derivatives_fixture.py: sub-01 has 4 lesions at ses-01
and 6 at ses-02, the head moved between the sessions), then the real change step on them
(``longitudinal.pair.align_files`` + ``compute_change``) written by the one writer
(``writer.write_change_derivatives``); sub-02's pair goes through the same code with an alignment too
poor to accept, so it is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_cl.derivatives import spec, writer
from bids_cl.derivatives.reader import collect_changes, collect_targets
from bids_cl.derivatives.records import AlignmentRecord
from bids_cl.reports import figures as figs
from bids_cl.reports import generate_participant_report
from bids_cl.utils.bids import WorkItem


def _files(target):
    from bids_cl.longitudinal.pair import SessionFiles

    return SessionFiles(prefix=target.prefix, lesion_mask=str(target.path("lesion_mask")),
                        probseg=str(target.path("probseg")), lesions_tsv=str(target.lesions_path),
                        connectivity=int(target.summary.get("Connectivity") or 26))


def _write_pair(out_dir: Path, participant: str, alignment=None):
    from bids_cl.longitudinal.pair import align_files, compute_change

    before, after = collect_targets(out_dir, participant)[:2]
    if alignment is None:
        alignment = align_files(str(before.path("preproc")), str(before.path("brain_mask")),
                                str(after.path("preproc")), str(after.path("brain_mask")), seed=42)
    change = compute_change(_files(before), _files(after), alignment)
    writer.write_change_derivatives(out_dir, WorkItem.from_dict(after.inputs), before.session,
                                    table=change.table, dseg=change.dseg, summary=change.summary,
                                    sources=[])
    return change


@pytest.fixture(scope="module")
def with_changes(real_derivatives, tmp_path_factory):
    ds = real_derivatives.copy_output(tmp_path_factory.mktemp("changes"))
    accepted = _write_pair(ds.out_dir, "01")
    poor = AlignmentRecord(before_to_after=np.eye(4).tolist(), quality=0.05,
                           quality_unaligned=0.05, method="test: an alignment too poor", seed=0)
    refused = _write_pair(ds.out_dir, "02", poor)
    return ds, accepted, refused


def test_change_section_shows_counts_figure_and_table(with_changes):
    ds, accepted, _ = with_changes
    assert accepted.refused is None, accepted.summary
    report = generate_participant_report(ds.out_dir, "01", templates=ds.templates)
    html = report.read_text()
    section = html[html.index('<section id="changes">'):]
    section = section[:section.index("</section>")]
    assert 'href="#changes"' in html
    assert "sub-01_ses-01 &rarr; sub-01_ses-02" in section
    s = accepted.summary
    for key in ("New", "Enlarging", "Stable", "Shrinking", "Disappeared"):
        assert re.search(rf"<th>{key}</th><td[^>]*>{s[key]}</td>", section), key
    shown = accepted.table[accepted.table["change"].isin(["new", "enlarging"])]
    n_shown = shown["lesion_id_after"].nunique()
    assert n_shown >= 1  # ses-02 has lesions ses-01 had not
    png = ds.out_dir / "sub-01" / "figures" / "sub-01_ses-02_desc-changeFrom01_T1w.png"
    assert png.is_file() and f'src="{png.relative_to(ds.out_dir).as_posix()}"' in section
    assert f"all {n_shown}" in section
    # one row of 2 x 3 panels per lesion shown
    from PIL import Image

    with Image.open(png) as img:
        width, height = img.size
    assert height == pytest.approx(width * n_shown / (2 * 3.25 - 0.25), rel=0.05)
    # the change table, every row
    assert 'data-rows-key="changes:sub-01_ses-02:01"' in section
    assert section.count("<tr>") - section.count("<tr><th>") >= len(accepted.table)
    assert "could not be drawn" not in section


def test_a_refused_pair_says_why_and_draws_nothing(with_changes):
    ds, _, refused = with_changes
    assert refused.refused and refused.table is None
    report = generate_participant_report(ds.out_dir, "02", templates=ds.templates)
    html = report.read_text()
    section = html[html.index('<section id="changes">'):]
    section = section[:section.index("</section>")]
    assert "No change classified" in section and "alignment" in section
    assert "<img" not in section
    assert not list((ds.out_dir / "sub-02" / "figures").glob("*changeFrom*"))


def test_no_change_outputs_no_section(with_changes):
    ds, _, _ = with_changes
    assert collect_changes(ds.out_dir, "03") == []
    html = generate_participant_report(ds.out_dir, "03", templates=ds.templates).read_text()
    assert 'id="changes"' not in html and 'href="#changes"' not in html


def test_earlier_crops_follow_the_alignment(tmp_path: Path):
    """The earlier session is drawn through the alignment: a head moved by 13 mm lands on the later
    crop with the true transform and not without it."""
    rng = np.random.default_rng(0)
    shape, affine = (40, 40, 40), np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -40.0
    base = nib.Nifti1Image(
        np.asarray(__import__("scipy").ndimage.gaussian_filter(rng.normal(size=shape), 2),
                   np.float32), affine)
    shift = np.array([10.0, -8.0, 4.0])  # earlier scanner mm -> later scanner mm
    before_to_after = np.eye(4)
    before_to_after[:3, 3] = shift
    # the earlier image: the same anatomy, seen shift mm away
    earlier = figs.resample_like(base, base, world=before_to_after)
    codes = np.zeros(shape, np.uint8)
    codes[18:22, 18:22, 18:22] = spec.CHANGE_CODES["new"]
    dseg = nib.Nifti1Image(codes, affine)
    centre = affine[:3, :3] @ np.array([19.5, 19.5, 19.5]) + affine[:3, 3]
    row = pd.DataFrame([{"lesion_id_after": 1, "change": "new", "volume_before_ul": 0.0,
                         "volume_after_ul": 512.0, "centroid_x": centre[0],
                         "centroid_y": centre[1], "centroid_z": centre[2]}])

    def agreement(matrix: np.ndarray) -> float:
        (crop,) = figs.change_crops(earlier, base, dseg, row, matrix)
        assert crop.lesion.sum() == 64
        return float(np.corrcoef(crop.earlier.ravel(), crop.later.ravel())[0, 1])

    assert agreement(before_to_after) > 0.95
    assert agreement(np.eye(4)) < 0.5
    png, n = figs.plot_changes(earlier, base, dseg, row, before_to_after, tmp_path / "c.png")
    assert n == 1 and png.is_file()
