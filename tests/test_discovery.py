"""Input discovery on layouts that mimic real MS datasets."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli, write_bids

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


def _rewrite(path: Path, data: np.ndarray) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), str(path))


@pytest.mark.parametrize(("content", "reason"), [
    ("truncated", "truncated or corrupt"),
    ("nan", "no finite voxel"),
    ("zeros", "no signal"),
    ("constant", "no signal"),
])
def test_unusable_image_contents_are_problems_before_any_work(tmp_path: Path, content: str,
                                                               reason: str) -> None:
    """A truncated .nii.gz crashed inside the workflow (exit 1); all-NaN and all-zero images 'succeeded'
    with 0 lesions. Each is now a discovery problem with exit 65 and one line."""
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None,
                                          "sub-02/anat/sub-02_T1w.nii.gz": None})
    path = root / "sub-01/anat/sub-01_T1w.nii.gz"
    shape = nib.load(path).shape
    if content == "truncated":  # header intact, data cut short (an interrupted copy)
        _rewrite(path, np.random.default_rng(0).random((32, 32, 32)))
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * 0.9)])
    else:
        _rewrite(path, {"nan": np.full(shape, np.nan), "zeros": np.zeros(shape),
                        "constant": np.full(shape, 7.0)}[content])
    assert [i.participant for i in _discover(root)] == ["02"]
    (problem,) = _problems(root)
    assert problem.problem_code == 65 and reason in problem.problem and "\n" not in problem.problem


def test_unusable_image_exits_65_with_one_line_and_no_output(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    path = root / "sub-01/anat/sub-01_T1w.nii.gz"
    _rewrite(path, np.full(nib.load(path).shape, np.nan))
    proc = run_cli(root, tmp_path / "out", "participant", "--skip-bids-validation", "--model", "demo",
                   "-w", tmp_path / "work")
    assert proc.returncode == 65, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no finite voxel" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("filters", "message"), [
    ({"t1w": {"acqusition": "mprage"}}, "unknown BIDS entity 'acqusition'"),
    ({"t1w": {"acquisition": {"nested": "dict"}}}, "not dict"),
    ({"t1w": {"run": True}}, "not bool"),
])
def test_bad_filter_file_is_a_usage_error(tmp_path: Path, filters: dict, message: str) -> None:
    """An unknown entity or a dict value reached pybids (exit 1, a six-line SQL dump); now 64, one line."""
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    path = tmp_path / "filters.json"
    path.write_text(json.dumps(filters))
    proc = run_cli(root, tmp_path / "out", "participant", "--skip-bids-validation",
                   "--bids-filter-file", path, "-w", tmp_path / "work")
    assert proc.returncode == 64, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
