"""Lesion change end to end: the real CLI on 2- and 3-session tiny phantoms with the demo model, checked
against the phantom truth; the pair step with the truth masks as the segmentation gets every class
right; reruns are byte-identical; the sessions' own outputs do not depend on --longitudinal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_cl.derivatives import spec
from bids_cl.derivatives.records import AlignmentRecord
from bids_cl.longitudinal.pair import LabelledSession, change_from_labels

pytestmark = pytest.mark.slow

TRUTH = Path("derivatives") / "manual_masks"


def _phantom(root: Path, sessions: int, seed: int) -> Path:
    from bids_cl.synth import generate_dataset

    generate_dataset(root, participants=1, sessions=sessions, seed=seed, size="tiny", field="3T",
                     sequence="mp2rage", lesion_free_fraction=0.0)
    return root


def _cli(bids: Path, out: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NIPYPE_NO_ET": "1", "BIDS_CL_HOME": str(work.parent / "home")}
    cmd = [sys.executable, "-m", "bids_cl", str(bids), str(out), "participant", "--model", "demo",
           "-w", str(work), "--nprocs", "2", "--omp-nthreads", "1", "--sloppy", "--output-spaces",
           "native", "--skip-bids-validation", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, check=False)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "log" not in p.relative_to(out).parts
            and "figures" not in p.relative_to(out).parts and not p.name.endswith(".html")}


def _truth_table(bids: Path, session: str) -> pd.DataFrame:
    prefix = f"sub-01_ses-{session}"
    path = bids / TRUTH / "sub-01" / f"ses-{session}" / "anat" / spec.reference_name(prefix, "lesions_table")
    table = pd.read_csv(path, sep="\t")
    return table[(table["label"] == "CL") & (table["volume_ul"] > 0)].reset_index(drop=True)


def _truth_session(bids: Path, session: str) -> LabelledSession:
    """The truth as a segmentation: CL lesions of the truth's label map, valued by their lesion_id."""
    prefix = f"sub-01_ses-{session}"
    folder = bids / TRUTH / "sub-01" / f"ses-{session}" / "anat"
    img = nib.load(folder / spec.reference_name(prefix, "lesions_dseg"))
    table = _truth_table(bids, session)
    labels = np.asanyarray(img.dataobj).astype(np.int32)
    labels[~np.isin(labels, table["lesion_id"].to_numpy())] = 0
    return LabelledSession(prefix, img, labels, table, (labels > 0).astype(np.float32))


def _expected(bids: Path, sessions: list[str], earlier: str, later: str) -> dict[int, str]:
    """Each truth CL lesion's class from ``earlier`` to ``later``, from the phantom's own course."""
    tables = {s: _truth_table(bids, s).set_index("lesion_id") for s in sessions}
    between = sessions[sessions.index(earlier) + 1: sessions.index(later) + 1]
    raw = {s: pd.read_csv(bids / TRUTH / "sub-01" / f"ses-{s}" / "anat" / spec.reference_name(
        f"sub-01_ses-{s}", "lesions_table"), sep="\t").set_index("lesion_id") for s in between}
    expected: dict[int, str] = {}
    ids = set(tables[earlier].index) | set(tables[later].index)
    for lesion in sorted(ids):
        course = [raw[s].at[lesion, "status"] for s in between if lesion in raw[s].index]
        in_e, in_l = lesion in tables[earlier].index, lesion in tables[later].index
        if in_l and not in_e and "new" in course:
            expected[lesion] = "new"
        elif in_e and not in_l and "disappeared" in course:
            expected[lesion] = "disappeared"
        elif in_e and in_l and len(course) == len(between):
            kinds = set(course)
            if kinds == {"stable"}:
                expected[lesion] = "stable"
            elif "enlarging" in kinds and "shrinking" not in kinds:
                expected[lesion] = "enlarging"
            elif "shrinking" in kinds and "enlarging" not in kinds:
                expected[lesion] = "shrinking"
    return expected


def _alignment(summary: dict) -> AlignmentRecord:
    return AlignmentRecord(before_to_after=summary["Alignment"]["BeforeToAfter"],
                           quality=summary["AlignmentQuality"],
                           quality_unaligned=summary["AlignmentQualityUnaligned"],
                           method=summary["Alignment"]["Method"], seed=summary["Alignment"]["Seed"])


def _pairs(sessions: list[str]) -> list[tuple[str, str]]:
    pairs = list(zip(sessions, sessions[1:], strict=False))
    return pairs + ([(sessions[0], sessions[-1])] if len(sessions) > 2 else [])


def _check_against_truth(bids: Path, out: Path, sessions: list[str]) -> dict[str, int]:
    """Change tables of the CLI run, and the pair step on the truth, against the phantom truth."""
    checked = {k: 0 for k in spec.CHANGE_CODES}
    for earlier, later in _pairs(sessions):
        prefix = f"sub-01_ses-{later}"
        anat = out / "sub-01" / f"ses-{later}" / "anat"
        summary = json.loads((anat / spec.change_name(prefix, "change_summary", earlier=earlier)).read_text())
        assert summary["AlignmentAccepted"] and summary["Refused"] is None, summary
        assert summary["AlignmentQuality"] > summary["AlignmentQualityUnaligned"]
        assert (summary["Earlier"], summary["Later"]) == (f"sub-01_ses-{earlier}", prefix)
        table = pd.read_csv(anat / spec.change_name(prefix, "change_table", earlier=earlier), sep="\t",
                            na_values="n/a", keep_default_na=False)
        assert list(table.columns) == spec.CHANGE_COLUMNS
        own = pd.read_csv(anat / spec.output_name(prefix, "lesions"), sep="\t")
        # every later lesion of the session's own table has a row, and the counts are the table's
        assert set(table["lesion_id_after"].dropna().astype(int)) == set(own["lesion_id"])
        for key, kind in (("New", "new"), ("Enlarging", "enlarging"), ("Stable", "stable"),
                          ("Shrinking", "shrinking")):
            assert summary[key] == table.loc[table["change"] == kind, "lesion_id_after"].nunique()
        dseg = nib.load(anat / spec.change_name(prefix, "change_dseg", earlier=earlier))
        mask = nib.load(anat / spec.output_name(prefix, "lesion_mask"))
        assert dseg.get_data_dtype() == np.uint8 and np.allclose(dseg.affine, mask.affine)
        codes = np.asanyarray(dseg.dataobj)
        predicted = np.asanyarray(mask.dataobj) > 0
        assert ((codes > 0) & (codes < 5) == predicted).all()  # later lesions carry 1-4, nothing else

        # Every truth lesion new since the earlier session that the model found is new in the map.
        truth_l = _truth_session(bids, later)
        for lesion, kind in _expected(bids, sessions, earlier, later).items():
            found = (truth_l.labels == lesion) & predicted
            if kind == "new" and found.any():
                values, counts = np.unique(codes[found], return_counts=True)
                assert values[counts.argmax()] == spec.CHANGE_CODES["new"], (earlier, later, lesion)

        # The pair step with the truth masks as the segmentation: every class right.
        result = change_from_labels(_truth_session(bids, earlier), truth_l, _alignment(summary))
        rows = result.table
        for lesion, kind in _expected(bids, sessions, earlier, later).items():
            column = "lesion_id_before" if kind == "disappeared" else "lesion_id_after"
            got = rows.loc[rows[column] == lesion, "change"].tolist()
            assert got == [kind], (earlier, later, lesion, kind, rows.to_string())
            checked[kind] += 1
        assert not rows["probability_rescued"].any()
    return checked


@pytest.fixture(scope="module")
def two_sessions(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("long2")
    bids = _phantom(base / "bids", 2, seed=5)
    proc = _cli(bids, base / "out", base / "work")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"bids": bids, "base": base, "proc": proc}


def test_two_sessions_against_the_truth(two_sessions: dict) -> None:
    checked = _check_against_truth(two_sessions["bids"], two_sessions["base"] / "out", ["01", "02"])
    assert checked["new"] >= 1 and checked["stable"] >= 1, checked
    assert "sub-01_ses-02: since ses-01:" in two_sessions["proc"].stdout


def test_rerun_is_byte_identical_and_sessions_do_not_depend_on_it(two_sessions: dict) -> None:
    base = two_sessions["base"]
    first = _snapshot(base / "out")
    assert any("changeFrom01" in name for name in first)
    fresh = _cli(two_sessions["bids"], base / "out2", base / "work2")  # new work folder: all recomputed
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert _snapshot(base / "out2") == first
    off = _cli(two_sessions["bids"], base / "out3", base / "work", "--longitudinal", "off")
    assert off.returncode == 0, off.stderr[-3000:]
    # every file but the change outputs and the methods text (which describes the change step)
    without = {k: v for k, v in _snapshot(base / "out3").items() if k != spec.CITATION_NAME}
    assert without == {k: v for k, v in first.items() if "changeFrom" not in k
                       and "changeSummaryFrom" not in k and k != spec.CITATION_NAME}
    assert b"Lesion change between sessions" not in (base / "out3" / spec.CITATION_NAME).read_bytes()


def test_three_sessions_against_the_truth(tmp_path: Path) -> None:
    bids = _phantom(tmp_path / "bids", 3, seed=3)
    proc = _cli(bids, tmp_path / "out", tmp_path / "work")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for later, earlier in (("02", "01"), ("03", "02"), ("03", "01")):
        assert f"sub-01_ses-{later}: since ses-{earlier}:" in proc.stdout
    checked = _check_against_truth(bids, tmp_path / "out", ["01", "02", "03"])
    assert all(checked[k] >= 1 for k in spec.CHANGE_CODES), checked
