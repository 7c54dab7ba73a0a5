"""Pairing, alignment and the pair step (bids_cl.longitudinal.pairs/align/pair) and the change writer:
the registration recovers a known head motion (RAS/LPS and direction conventions), a poor alignment is
refused (summary only, never a table), a lesion table that disagrees with its mask is refused."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bids_cl.derivatives import spec
from bids_cl.derivatives.records import AlignmentRecord
from bids_cl.derivatives.writer import write_change_derivatives
from bids_cl.engine.lesions import lesion_table
from bids_cl.errors import BidsClError
from bids_cl.longitudinal.align import HalfwaySpace, halfway, itk_to_ras, resample
from bids_cl.longitudinal.pair import SessionFiles, align_files, compute_change
from bids_cl.longitudinal.pairs import BASELINE_LAST, CONSECUTIVE, plan_pairs, session_key
from bids_cl.utils.bids import Problem, WorkItem
from bids_cl.utils.components import label_components

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = -40.0
SHAPE = (40, 40, 40)


def _item(session: str | None, *, sequence: str = "MP2RAGE", suffix: str = "UNIT1", acq: str | None = None,
          participant: str = "01") -> WorkItem:
    entities = {"subject": participant, "session": session, "acquisition": acq}
    prefix = "_".join([f"sub-{participant}", *([f"ses-{session}"] if session else []),
                       *([f"acq-{acq}"] if acq else [])])
    return WorkItem(participant=participant, session=session, target=f"/x/{prefix}_{suffix}.nii.gz",
                    target_suffix=suffix, entities=entities, prefix=prefix, sequence=sequence)


# ------------------------------------------------------------------------------------------ pairs


def test_consecutive_pairs_and_baseline_to_last_in_natural_session_order() -> None:
    items = [_item(s) for s in ("10", "2", "1")]
    pairs, warnings = plan_pairs(items)
    assert [(p.earlier.session, p.later.session, p.kind) for p in pairs] == [
        ("1", "2", CONSECUTIVE), ("2", "10", CONSECUTIVE), ("1", "10", BASELINE_LAST)]
    assert warnings == []
    assert pairs[0].name == "sub-01_ses-2_desc-changeFrom1"
    assert session_key("2") < session_key("10") < session_key("pre")


def test_sessions_of_other_lines_and_unusable_sessions_are_named() -> None:
    items = [_item("01", acq="mp2rage"), _item("02", acq="mp2rage"),
             _item("02", sequence="MPRAGE", suffix="T1w", acq="mprage"), _item(None, participant="02")]
    problems = [Problem(participant="01", session="03", prefix="sub-01_ses-03", problem="no T1w image",
                        problem_code=66)]
    pairs, warnings = plan_pairs(items, problems)
    assert [(p.earlier.prefix, p.later.prefix) for p in pairs] == [
        ("sub-01_ses-01_acq-mp2rage", "sub-01_ses-02_acq-mp2rage")]
    assert len(warnings) == 2
    assert warnings[0].startswith("sub-01_ses-02_acq-mprage: no other session of sub-01 has a MPRAGE T1w "
                                  "(sub-01_acq-mprage) target")
    assert warnings[1] == "sub-01_ses-03: left out of the lesion change pairs (no T1w image)"
    # a single-session participant is not worth a warning
    assert plan_pairs([_item("01", participant="03")]) == ([], [])


def test_same_prefix_line_but_another_sequence_is_not_paired() -> None:
    # ses-01 has only an MP2RAGE UNI, ses-02 only an MPRAGE, neither with acq-: one prefix line
    # (spec.line_of), two sequences: the contrasts differ, so no change is computed
    pairs, warnings = plan_pairs([_item("01"), _item("02", sequence="MPRAGE", suffix="T1w")])
    assert pairs == [] and len(warnings) == 2


# ----------------------------------------------------------------------------------- alignment


def _rigid(deg: tuple[float, float, float], shift: tuple[float, float, float]) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", deg, degrees=True).as_matrix()
    m[:3, 3] = shift
    return m


def test_halfway_is_the_square_root_and_itk_parameters_convert() -> None:
    m = _rigid((4.0, -3.0, 2.0), (3.0, -5.0, 1.5))
    s = halfway(m)
    assert np.allclose(s @ s, m)
    # ITK: y = A (x - c) + t + c in LPS; the RAS matrix of the identity with a shift flips x and y.
    ras = itk_to_ras([1, 0, 0, 0, 1, 0, 0, 0, 1, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert np.allclose(ras[:3, 3], [-1.0, -2.0, 3.0]) and np.allclose(ras[:3, :3], np.eye(3))


def _head(seed: int = 0) -> np.ndarray:
    """A smooth random 'brain': blobs inside a ball, background 0."""
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0)
    grid = np.indices(SHAPE) - (np.array(SHAPE)[:, None, None, None] - 1) / 2
    ball = (grid ** 2).sum(axis=0) < 15 ** 2
    return np.where(ball, 100 + 400 * (data - data.min()) / np.ptp(data), 0).astype(np.float32)


def _save(tmp: Path, name: str, data: np.ndarray) -> str:
    path = tmp / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    return str(path)


def test_registration_recovers_a_known_motion_and_refuses_an_unrelated_image(tmp_path: Path) -> None:
    before = _head()
    m_true = _rigid((5.0, 0.0, -3.0), (4.0, -2.0, 3.0))   # earlier scanner point -> later scanner point
    # the later image shows the same anatomy moved by m_true: sample the earlier image at m_true^-1 x
    after = resample(before, AFFINE, AFFINE, SHAPE, np.linalg.inv(m_true), order=1)
    masks = {k: _save(tmp_path, f"{k}_mask", (v > 0).astype(np.uint8))
             for k, v in (("before", before), ("after", after))}
    record = align_files(_save(tmp_path, "before", before), masks["before"], _save(tmp_path, "after", after),
                         masks["after"], seed=7)
    m = np.asarray(record.before_to_after)
    point = np.array([10.0, -5.0, 8.0, 1.0])
    assert np.linalg.norm((m @ point - m_true @ point)[:3]) < 1.0   # mm, on 2 mm voxels
    assert record.quality > 0.95 > record.quality_unaligned
    again = align_files(_save(tmp_path, "before", before), masks["before"],
                        _save(tmp_path, "after", after), masks["after"], seed=7)
    assert again.before_to_after == record.before_to_after          # deterministic with the seed

    other = _head(seed=1)
    poor = align_files(_save(tmp_path, "before", before), masks["before"], _save(tmp_path, "other", other),
                       _save(tmp_path, "other_mask", (other > 0).astype(np.uint8)), seed=7)
    assert poor.quality < 0.8


def test_a_bias_field_between_sessions_is_not_taken_for_misalignment(tmp_path: Path) -> None:
    # The same anatomy, perfectly aligned, under a smooth receive-field bias at the later session (as at
    # 7 T): raw intensities correlate poorly (the old rule refused such a pair), the flattened ones do not.
    from bids_cl.longitudinal.align import alignment_quality, correlation

    before = _head()
    x = np.linspace(-1.0, 1.0, SHAPE[0])[:, None, None] * np.ones(SHAPE)
    after = (before * (1.0 + 0.6 * x)).astype(np.float32)
    mask = (before > 0).astype(np.uint8)
    b, m = _save(tmp_path, "b", before), _save(tmp_path, "m", mask)
    a = _save(tmp_path, "a", after)
    assert correlation(before, after, mask > 0) < 0.8
    assert alignment_quality(b, m, a, m, np.eye(4)) > 0.85
    # ... while a real misalignment (4 mm) still lowers it
    moved = resample(before, AFFINE, AFFINE, SHAPE, np.linalg.inv(_rigid((0, 0, 0), (4.0, 0, 0))), order=1)
    assert alignment_quality(b, m, _save(tmp_path, "moved", moved), m, np.eye(4)) < 0.8


# --------------------------------------------------------------------------------- pair step


def _session(tmp: Path, name: str, labels: np.ndarray, connectivity: int = 26) -> SessionFiles:
    lab, n = label_components(labels > 0, connectivity)
    prob = (labels > 0).astype(np.float32) * 0.9
    table = lesion_table(lab, n, prob, AFFINE)
    tsv = tmp / f"{name}_lesions.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    return SessionFiles(prefix=name, lesion_mask=_save(tmp, f"{name}_lesions", (labels > 0).astype(np.uint8)),
                        probseg=_save(tmp, f"{name}_prob", prob), lesions_tsv=str(tsv),
                        connectivity=connectivity)


def _identity(quality: float) -> AlignmentRecord:
    return AlignmentRecord(before_to_after=np.eye(4).tolist(), quality=quality, quality_unaligned=quality,
                           method="test", seed=0)


def _later_item() -> WorkItem:
    return _item("02")


def test_refused_alignment_writes_only_the_summary_and_removes_a_stale_table(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[5:9, 5:9, 5:9] = 1
    before, after = _session(tmp_path, "b", labels), _session(tmp_path, "a", labels)
    out = tmp_path / "out"
    accepted = compute_change(before, after, _identity(0.95))
    assert accepted.refused is None and accepted.summary["Stable"] == 1
    write_change_derivatives(out, _later_item(), "01", table=accepted.table, dseg=accepted.dseg,
                             summary=accepted.summary, sources=[])
    anat = out / _later_item().anat_dir
    table_path = anat / spec.change_name(_later_item().prefix, "change_table", earlier="01")
    assert table_path.is_file()
    assert table_path.read_text().splitlines()[1].endswith("\tfalse")

    refused = compute_change(before, after, _identity(0.5))
    assert refused.table is None and refused.dseg is None
    assert "poor" in refused.refused and refused.summary["New"] is None
    written = write_change_derivatives(out, _later_item(), "01", table=None, dseg=None,
                                       summary=refused.summary, sources=[])
    assert [p.name for p in written] == [spec.change_name(_later_item().prefix, "change_summary",
                                                          earlier="01")]
    assert sorted(p.name for p in anat.iterdir()) == [written[0].name]
    summary = json.loads(written[0].read_text())
    assert list(summary) == list(spec.CHANGE_SUMMARY_FIELDS)
    assert summary["AlignmentAccepted"] is False and summary["Refused"] == refused.refused


def test_a_lesion_table_that_disagrees_with_its_mask_is_refused(tmp_path: Path) -> None:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[5:9, 5:9, 5:9] = 1
    labels[20:22, 20:22, 20:22] = 1
    good = _session(tmp_path, "b", labels)
    table = pd.read_csv(good.lesions_tsv, sep="\t").iloc[:1]
    table.to_csv(good.lesions_tsv, sep="\t", index=False)
    with pytest.raises(BidsClError, match="does not match its lesion mask"):
        compute_change(good, _session(tmp_path, "a", labels), _identity(0.95))


def test_halfway_space_moves_both_sessions_half_way() -> None:
    m = _rigid((0.0, 0.0, 0.0), (8.0, 0.0, 0.0))   # the head moved 8 mm (4 voxels) along x
    before = np.zeros(SHAPE, dtype=np.int32)
    before[10:14, 18:22, 18:22] = 1
    after = resample(before, AFFINE, AFFINE, SHAPE, np.linalg.inv(m), order=0)
    assert np.argwhere(after == 1)[:, 0].min() == 14
    space = HalfwaySpace(m, AFFINE, AFFINE, SHAPE)
    b, a = space.from_before(before, order=0), space.from_after(after, order=0)
    assert np.array_equal(a, b) and np.argwhere(b == 1)[:, 0].min() == 12   # both moved by 2 voxels
    assert np.array_equal(space.to_after(before, order=0), after)
    assert np.allclose(space.points_to_after(np.array([[1.0, 2.0, 3.0]])), [[9.0, 2.0, 3.0]])


# ------------------------------------------------------------------------------------------ runner


def test_runner_reports_refused_and_unpairable_as_warnings_and_a_failed_pair_as_failure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses
    import logging

    from bids_cl.cli.workflow import _change_outcomes
    from bids_cl.config import RunConfig
    from bids_cl.derivatives.records import STATUS_FAILED, STATUS_OK, STATUS_REFUSED, TargetRecord
    from bids_cl.derivatives.writer import write_target_record
    from bids_cl.workflows.longitudinal import pair_record_file

    config = RunConfig(bids_dir=tmp_path, output_dir=tmp_path / "out", run_uuid="run1")
    items = [_item(s) for s in ("1", "2", "3", "4")]
    items.append(_item("2", sequence="MPRAGE", suffix="T1w", acq="mprage"))
    outcomes = {i.prefix: TargetRecord(prefix=i.prefix, status=STATUS_OK) for i in items}
    outcomes["sub-01_ses-4"] = TargetRecord(prefix="sub-01_ses-4", status=STATUS_FAILED, exit_code=65)
    log_dir = spec.log_dir(config.output_dir, "01", config.run_uuid)
    pairs = {(p.earlier.session, p.later.session): p for p in plan_pairs(items)[0]}
    assert set(pairs) == {("1", "2"), ("2", "3"), ("3", "4"), ("1", "4")}
    ok = pairs[("1", "2")]
    write_target_record(log_dir, TargetRecord(prefix=ok.name, status=STATUS_OK))
    summary = {"New": 1, "Enlarging": 2, "Stable": 3, "Shrinking": 0, "Disappeared": 4}
    summary_path = config.output_dir / ok.later.anat_dir / spec.change_name(ok.later.prefix, "change_summary",
                                                                            earlier="1")
    summary_path.parent.mkdir(parents=True)
    summary_path.write_text(json.dumps(summary))
    refused = pairs[("2", "3")]
    write_target_record(log_dir, TargetRecord(prefix=refused.name, status=STATUS_REFUSED,
                                              reason="alignment is poor"))
    assert pair_record_file(config, refused) == log_dir / spec.RECORDS_DIR / f"{refused.name}.json"
    # (3, 4) and (1, 4): ses-4 failed, so no record is expected; nothing else left a record either
    with caplog.at_level(logging.WARNING, logger="bids_cl.workflow"):
        failures = _change_outcomes(config, items, [], outcomes, {"01": log_dir})
    assert failures == []
    warnings = [r.getMessage() for r in caplog.records]
    assert any(w.startswith("sub-01_ses-2_acq-mprage: no other session") for w in warnings)
    assert f"{refused.name}: alignment is poor" in warnings
    assert f"{pairs[('3', '4')].name}: no lesion change computed: sub-01_ses-4 failed" in warnings
    assert "sub-01_ses-2: since ses-1: 1 new, 2 enlarging, 3 stable, 0 shrinking, 4 disappeared" \
        in capsys.readouterr().out

    # a pair that failed by itself (its own record) is a failure with its exit code and a crash note
    outcomes["sub-01_ses-4"] = TargetRecord(prefix="sub-01_ses-4", status=STATUS_OK)
    write_target_record(log_dir, TargetRecord(prefix=pairs[("3", "4")].name, status=STATUS_FAILED,
                                              exit_code=73, reason="cannot write"))
    write_target_record(log_dir, TargetRecord(prefix=pairs[("1", "4")].name, status=STATUS_OK))
    (config.output_dir / "sub-01" / "ses-4" / "anat").mkdir(parents=True)
    (config.output_dir / "sub-01" / "ses-4" / "anat" / spec.change_name(
        "sub-01_ses-4", "change_summary", earlier="1")).write_text(json.dumps(summary))
    failures = _change_outcomes(config, items, [], outcomes, {"01": log_dir})
    assert [(f[0].prefix, f[1], f[2]) for f in failures] == [(pairs[("3", "4")].name, "cannot write", 73)]
    assert (log_dir / spec.crash_note_name(pairs[("3", "4")].name)).is_file()
    assert _change_outcomes(dataclasses.replace(config, longitudinal="off"), items, [], outcomes,
                            {"01": log_dir}) == []


def test_sessions_without_lesions_give_an_empty_table_or_only_new_lesions(tmp_path: Path) -> None:
    empty = np.zeros(SHAPE, dtype=np.uint8)
    one = empty.copy()
    one[5:9, 5:9, 5:9] = 1
    out = tmp_path / "out"
    nothing = compute_change(_session(tmp_path, "b", empty), _session(tmp_path, "a", empty), _identity(0.9))
    assert len(nothing.table) == 0 and not np.asarray(nothing.dseg.dataobj).any()
    assert (nothing.summary["New"], nothing.summary["Disappeared"], nothing.summary["NetVolumeChange_uL"]) \
        == (0, 0, 0.0)
    written = write_change_derivatives(out, _later_item(), "01", table=nothing.table, dseg=nothing.dseg,
                                       summary=nothing.summary, sources=[])
    assert written[0].read_text() == "\t".join(spec.CHANGE_COLUMNS) + "\n"
    appeared = compute_change(_session(tmp_path, "b", empty), _session(tmp_path, "a", one), _identity(0.9))
    assert appeared.table["change"].tolist() == ["new"] and appeared.summary["New"] == 1
    assert appeared.table["volume_after_ul"].tolist() == pytest.approx([64 * 8.0])
    assert set(np.unique(np.asarray(appeared.dseg.dataobj))) == {0, spec.CHANGE_CODES["new"]}
    gone = compute_change(_session(tmp_path, "b", one), _session(tmp_path, "a", empty), _identity(0.9))
    assert gone.table["change"].tolist() == ["disappeared"] and gone.summary["Disappeared"] == 1
    assert (np.asarray(gone.dseg.dataobj) == spec.CHANGE_CODES["disappeared"]).sum() == 64
    assert gone.table["centroid_x"].notna().all()   # the earlier centroid, mapped into the later session
