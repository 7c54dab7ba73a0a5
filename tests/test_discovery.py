"""Input discovery on layouts that mimic real MS datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_bids

from bids_cl.errors import BidsClError
from bids_cl.utils.bids import (
    check_output_locations,
    discover,
    load_bids_filters,
    make_layout,
    prefix_of,
)


def _discover(root: Path, **kwargs):
    return discover(make_layout(root), **kwargs).items


def _problems(root: Path, **kwargs):
    return discover(make_layout(root), **kwargs).problems


def test_unit1_with_inversions_ignores_phase_parts(mp2rage_dataset: Path) -> None:
    (item,) = _discover(mp2rage_dataset)
    assert item.target_suffix == "UNIT1"
    assert item.sequence == "MP2RAGE"
    assert item.field_strength == 7.0
    assert item.inv1.endswith("inv-1_part-mag_MP2RAGE.nii.gz")
    assert item.inv2.endswith("inv-2_part-mag_MP2RAGE.nii.gz")
    assert item.t1map.endswith("_T1map.nii.gz")  # recorded, not segmented
    assert item.prefix == "sub-01_ses-01"
    assert item.session == "01"
    assert any("UNIT1" in e for e in item.evidence)


def test_uni_filed_as_t1w_is_recognised_from_acq_and_sidecar(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {
        "sub-01/anat/sub-01_acq-mp2rage_T1w.nii.gz": {"MagneticFieldStrength": 3},
        "sub-02/anat/sub-02_acq-highres_T1w.nii.gz": {
            "MagneticFieldStrength": 3, "InversionTime": [0.7, 2.5],
            "SeriesDescription": "t1_mp2rage_sag_p3_UNI_Images"},
        "sub-03/anat/sub-03_T1w.nii.gz": {"MagneticFieldStrength": 3,
                                          "PulseSequenceType": "MPRAGE"},
    })
    items = {i.participant: i for i in _discover(root)}
    assert items["01"].sequence == "MP2RAGE"
    assert any("acq-mp2rage" in e for e in items["01"].evidence)
    assert items["02"].sequence == "MP2RAGE"
    assert any("InversionTime" in e for e in items["02"].evidence)
    assert any("SeriesDescription" in e for e in items["02"].evidence)
    assert items["03"].sequence == "MPRAGE"
    assert items["03"].session is None
    assert items["03"].prefix == "sub-03"


def test_two_sessions_and_two_runs_are_separate_targets(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {
        "sub-01/ses-01/anat/sub-01_ses-01_run-1_T1w.nii.gz": None,
        "sub-01/ses-01/anat/sub-01_ses-01_run-2_T1w.nii.gz": None,
        "sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz": None,
    })
    items = _discover(root)
    assert sorted(i.prefix for i in items) == [
        "sub-01_ses-01_run-1", "sub-01_ses-01_run-2", "sub-01_ses-02"]
    assert {i.session for i in items} == {"01", "02"}
    only_two = _discover(root, session_label=["02"])
    assert [i.prefix for i in only_two] == ["sub-01_ses-02"]


def test_both_sequences_in_one_session_get_distinct_prefixes(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {
        "sub-01/anat/sub-01_UNIT1.nii.gz": None,
        "sub-01/anat/sub-01_T1w.nii.gz": None,
        "sub-01/anat/sub-01_inv-2_MP2RAGE.nii.gz": None,
    })
    items = {i.target_suffix: i for i in _discover(root)}
    assert items["T1w"].prefix == "sub-01"
    assert items["UNIT1"].prefix == "sub-01_acq-UNIT1"
    assert items["UNIT1"].inv2.endswith("sub-01_inv-2_MP2RAGE.nii.gz")
    assert items["T1w"].inv2 is None  # MPRAGE targets take no inversion helpers


def test_inversions_matched_by_acquisition(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {
        "sub-01/anat/sub-01_acq-mp2rage_UNIT1.nii.gz": None,
        "sub-01/anat/sub-01_acq-mp2rage_inv-2_part-mag_MP2RAGE.nii.gz": None,
        "sub-01/anat/sub-01_acq-other_inv-2_part-mag_MP2RAGE.nii.gz": None,
    })
    (item,) = _discover(root)
    assert "acq-mp2rage_inv-2" in item.inv2


def test_zero_byte_image_is_flagged_not_crashing(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {
        "sub-01/anat/sub-01_T1w.nii.gz": {"__empty__": True},
    })
    assert _discover(root) == []
    (problem,) = _problems(root)
    assert problem.problem_code == 65
    assert "0-byte" in problem.problem and problem.target.endswith("sub-01_T1w.nii.gz")


def test_participant_without_t1_weighted_image(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {
        "sub-01/anat/sub-01_T1w.nii.gz": None,
        "sub-02/anat/sub-02_FLAIR.nii.gz": None,
    })
    assert [i.participant for i in _discover(root)] == ["01"]
    (problem,) = _problems(root)
    # No placeholder target: the participant without an image is a problem, not a WorkItem.
    assert (problem.participant, problem.problem_code, problem.target) == ("02", 66, None)
    with pytest.raises(BidsClError) as err:
        _discover(root, participant_label=["02"])
    assert err.value.code == 66


def test_filters_override_queries_and_can_select_nothing(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {
        "sub-01/anat/sub-01_acq-mprage_T1w.nii.gz": None,
        "sub-01/anat/sub-01_T1w.nii.gz": None,
    })
    items = _discover(root, bids_filters={"t1w": {"acquisition": "mprage"}})
    assert [i.prefix for i in items] == ["sub-01_acq-mprage"]
    items = _discover(root, bids_filters={"t1w": {"acquisition": None}})
    assert [i.prefix for i in items] == ["sub-01"]
    items = _discover(root, bids_filters={"t1w": {"acquisition": "*"}})
    assert [i.prefix for i in items] == ["sub-01_acq-mprage"]
    with pytest.raises(BidsClError) as err:
        _discover(root, bids_filters={"t1w": {"acquisition": "nothing"}})
    assert err.value.code == 18


def test_filter_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "f.json"
    bad.write_text(json.dumps({"flair": {"acquisition": "x"}}))
    with pytest.raises(BidsClError) as err:
        load_bids_filters(bad)
    assert err.value.code == 64


def test_output_inside_input_refused(tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    check_output_locations(bids, bids / "derivatives" / "bids_cl", tmp_path / "work")
    with pytest.raises(BidsClError):
        check_output_locations(bids, bids / "out", None)
    with pytest.raises(BidsClError):
        check_output_locations(bids, tmp_path / "out", bids / "work")


def test_prefix_of() -> None:
    assert prefix_of("/x/sub-01_ses-02_acq-UNI_T1w.nii.gz") == "sub-01_ses-02_acq-UNI"
    assert prefix_of("sub-01_UNIT1.nii") == "sub-01"
