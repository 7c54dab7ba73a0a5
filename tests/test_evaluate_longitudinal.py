"""bids_cl-evaluate --longitudinal on constructed change outputs and phantom-style truth (20³ images).

The scene (one participant, sessions 01 -> 02, same grid):

truth   1 CL stable (cube 3 at 2,2,2)        2 CL enlarging (cube 2 -> 3 at 12,2,2)
        3 CL disappeared (cube 3 at 2,12,2)  4 CL new (cube 3 at 12,12,12)
        6 CL new (cube 2 at 2,12,14), missed 5 WML (cube 3 at 14,2,14), never predicted
ses-01 prediction: 1 = (2,2,2), 2 = (2,12,2), 3 = an FP at (8,8,8), 4 = (12,2,2) (raster order)
change: 1 stable, 4 enlarging, 2 disappeared, 3 disappeared (a false disappearance);
        map at ses-02: 3 on (2,2,2), 2 on (12,2,2), 1 on (12,12,12) and on an FP at (16,16,2),
        5 on the footprint of earlier lesion 2
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_cl.derivatives import spec
from bids_cl.evaluation.cli import main
from bids_cl.evaluation.longitudinal import (
    MISSED,
    NO_TRUTH,
    component_classes,
    confusion_table,
    truth_classes,
)

SHAPE = (20, 20, 20)
AFFINE = np.eye(4)
CODES = spec.CHANGE_CODES


def save(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8 if data.max() < 256 else np.int16), AFFINE), path)
    return path


def cube(data: np.ndarray, corner: tuple[int, int, int], size: int, value: int = 1) -> np.ndarray:
    i, j, k = corner
    data[i:i + size, j:j + size, k:k + size] = value
    return data


def truth_session(ref: Path, ses: str, lesions: dict[int, tuple], rows: list[dict]) -> None:
    prefix = f"sub-01_ses-{ses}"
    anat = ref / "sub-01" / f"ses-{ses}" / "anat"
    dseg = np.zeros(SHAPE, np.int16)
    for lesion_id, (corner, size) in lesions.items():
        cube(dseg, corner, size, lesion_id)
    cl = [r["lesion_id"] for r in rows if r["label"] == "CL"]
    save(anat / spec.reference_name(prefix, "lesions_dseg"), dseg)
    save(anat / spec.reference_name(prefix, "cl_mask"), np.isin(dseg, cl))
    save(anat / spec.reference_name(prefix, "wml_mask"), (dseg > 0) & ~np.isin(dseg, cl))
    pd.DataFrame(rows).to_csv(anat / spec.reference_name(prefix, "lesions_table"), sep="\t",
                              index=False, na_rep="n/a")


def row(lesion_id: int, label: str, volume: float, status: str) -> dict:
    return {"lesion_id": lesion_id, "type": "leukocortical" if label == "CL" else "deep_wm",
            "label": label, "volume_ul": volume, "status": status}


def prediction(out: Path, ses: str, mask: np.ndarray) -> None:
    prefix = f"sub-01_ses-{ses}"
    anat = out / spec.anat_dir("01", ses)
    save(anat / spec.output_name(prefix, "lesion_mask"), mask)
    (anat / spec.output_name(prefix, "summary")).write_text(json.dumps(
        {"LesionCount": 1, "Connectivity": 26, "Sequence": "MP2RAGE", "FieldStrength": 3.0}))


def change_outputs(out: Path, later: str, earlier: str, *, table: pd.DataFrame | None,
                   dseg: np.ndarray | None, refused: str | None = None, counts=None) -> None:
    prefix = f"sub-01_ses-{later}"
    anat = out / spec.anat_dir("01", later)
    name = lambda key: anat / spec.change_name(prefix, key, earlier=earlier)  # noqa: E731
    if table is not None:
        table.reindex(columns=spec.CHANGE_COLUMNS).to_csv(name("change_table"), sep="\t",
                                                          index=False, na_rep="n/a")
        save(name("change_dseg"), dseg)
    summary = {**dict(zip(["New", "Enlarging", "Stable", "Shrinking", "Disappeared"],
                          counts or [None] * 5, strict=True)),
               "NetVolumeChange_uL": 0.0, "AlignmentQuality": 0.2 if refused else 0.95,
               "AlignmentAccepted": not refused, "Rules": {},
               "Earlier": f"sub-01_ses-{earlier}", "Later": prefix, "Refused": refused}
    name("change_summary").write_text(json.dumps(summary))


@pytest.fixture
def scene(tmp_path: Path) -> dict[str, Path]:
    ref = tmp_path / "phantom" / "derivatives" / "manual_masks"
    out = tmp_path / "out"
    truth_session(ref, "01", {1: ((2, 2, 2), 3), 2: ((12, 2, 2), 2), 3: ((2, 12, 2), 3),
                              5: ((14, 2, 14), 3)},
                  [row(1, "CL", 27, "baseline"), row(2, "CL", 8, "baseline"),
                   row(3, "CL", 27, "baseline"), row(5, "WML", 27, "baseline")])
    truth_session(ref, "02", {1: ((2, 2, 2), 3), 2: ((12, 2, 2), 3), 4: ((12, 12, 12), 3),
                              5: ((14, 2, 14), 3), 6: ((2, 12, 14), 2)},
                  [row(1, "CL", 27, "stable"), row(2, "CL", 27, "enlarging"),
                   row(3, "CL", 0, "disappeared"), row(4, "CL", 27, "new"),
                   row(5, "WML", 27, "stable"), row(6, "CL", 8, "new")])
    before = np.zeros(SHAPE)
    for corner, size in (((2, 2, 2), 3), ((2, 12, 2), 3), ((8, 8, 8), 2), ((12, 2, 2), 2)):
        cube(before, corner, size)
    prediction(out, "01", before)
    codes = np.zeros(SHAPE, np.uint8)
    cube(codes, (2, 2, 2), 3, CODES["stable"])
    cube(codes, (12, 2, 2), 3, CODES["enlarging"])
    cube(codes, (12, 12, 12), 3, CODES["new"])
    cube(codes, (16, 16, 2), 2, CODES["new"])
    cube(codes, (2, 12, 2), 3, CODES["disappeared"])
    prediction(out, "02", np.isin(codes, [1, 2, 3, 4]))
    table = pd.DataFrame({
        "lesion_id_before": [1, 4, 2, 3, None, None],
        "lesion_id_after": [1, 3, None, None, 2, 4],
        "change": ["stable", "enlarging", "disappeared", "disappeared", "new", "new"],
        "merge_split": ["none"] * 6,
    })
    change_outputs(out, "02", "01", table=table, dseg=codes, counts=[2, 1, 1, 0, 2])
    return {"out": out, "ref": ref, "eval": tmp_path / "eval"}


def test_new_lesions_and_change_classes_against_the_truth(scene, capsys):
    code = main([str(scene["out"]), "--reference", str(scene["ref"]), "--longitudinal",
                 "--bootstrap", "20", "-o", str(scene["eval"])])
    assert code == 0, capsys.readouterr().err
    folder = scene["eval"] / "longitudinal"
    pairs = pd.read_csv(folder / "pairs.tsv", sep="\t")
    (pair,) = pairs.to_dict("records")
    assert (pair["earlier"], pair["later"]) == ("sub-01_ses-01", "sub-01_ses-02")
    # predicted new: the TP at 12,12,12 and the FP; truth new: 4 (found) and 6 (missed)
    assert (pair["truth_new"], pair["pred_new"], pair["new_tp"], pair["new_fp"],
            pair["new_usl"], pair["new_fn"]) == (2, 2, 1, 1, 0, 1)
    assert pair["new_f1"] == pytest.approx(0.5) and pair["new_recall"] == pytest.approx(0.5)
    assert pair["new_precision"] == pytest.approx(0.5)
    assert pair["class_agreement"] == pytest.approx(4 / 5)
    assert (pair["truth_stable"], pair["truth_enlarging"], pair["truth_disappeared"]) == (1, 1, 1)

    confusion = pd.read_csv(folder / "confusion.tsv", sep="\t").set_index("truth_class")
    assert confusion.loc["stable", "stable"] == 1 and confusion.loc["enlarging", "enlarging"] == 1
    assert confusion.loc["disappeared", "disappeared"] == 1
    assert confusion.loc["new", "new"] == 1 and confusion.loc["new", MISSED] == 1
    # the FP new component and the false disappearance of earlier lesion 3 (on no truth lesion)
    assert confusion.loc[NO_TRUTH, "new"] == 1 and confusion.loc[NO_TRUTH, "disappeared"] == 1
    assert int(confusion["n"].sum()) == 5 + 2
    assert confusion.loc["shrinking", "n"] == 0

    lesions = pd.read_csv(folder / "lesions.tsv", sep="\t").set_index("truth_id")
    assert lesions.loc[3, "matched_in"] == "earlier" and lesions.loc[6, "matched_in"] == "none"
    assert 5 not in lesions.index  # WML: not a cortical lesion
    aggregate = pd.read_csv(folder / "aggregate.tsv", sep="\t").set_index("metric")
    assert aggregate.loc["new_f1", "pooled"] == pytest.approx(0.5)
    assert aggregate.loc["new_f1", "n_pairs"] == 1
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["PairsEvaluated"] == 1 and settings["PairsRefused"] == 0
    assert {"NewLesionDetection", "TruthClass", "PredictedClass"} <= set(settings["Conventions"])
    assert "Longitudinal: 1 pair(s)" in capsys.readouterr().out
    # the cross-sectional evaluation ran as well
    assert (scene["eval"] / "images.tsv").is_file()


def test_a_refused_pair_is_listed_and_left_out(scene):
    # a third session whose alignment was refused: no table, no map
    ref = scene["ref"]
    truth_session(ref, "03", {1: ((2, 2, 2), 3)}, [row(1, "CL", 27, "stable")])
    prediction(scene["out"], "03", cube(np.zeros(SHAPE), (2, 2, 2), 3))
    change_outputs(scene["out"], "03", "02", table=None, dseg=None, refused="alignment is poor")
    assert main([str(scene["out"]), "--reference", str(ref), "--longitudinal", "--bootstrap", "0",
                 "-o", str(scene["eval"])]) == 0
    folder = scene["eval"] / "longitudinal"
    pairs = pd.read_csv(folder / "pairs.tsv", sep="\t").set_index("later")
    assert pairs.loc["sub-01_ses-03", "refused"] == "alignment is poor"
    assert np.isnan(pairs.loc["sub-01_ses-03", "new_f1"])
    assert json.loads((folder / "settings.json").read_text())["PairsRefused"] == 1
    confusion = pd.read_csv(folder / "confusion.tsv", sep="\t")
    assert int(confusion["n"].sum()) == 7  # the refused pair adds nothing
    aggregate = pd.read_csv(folder / "aggregate.tsv", sep="\t").set_index("metric")
    assert aggregate.loc["new_f1", "n_pairs"] == 1


def test_no_change_outputs_is_exit_66_and_nothing_written(scene, capsys):
    for path in scene["out"].rglob("*changeSummaryFrom*"):
        path.unlink()
    assert main([str(scene["out"]), "--reference", str(scene["ref"]), "--longitudinal",
                 "-o", str(scene["eval"])]) == 66
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no lesion change outputs" in err[0]
    assert not scene["eval"].exists()


def test_truth_classes_follow_the_course_across_skipped_sessions():
    def table(rows):
        return pd.DataFrame(rows, columns=["lesion_id", "label", "volume_ul", "status"])

    tables = {
        "01": table([(1, "CL", 30, "baseline"), (2, "CL", 30, "baseline"), (3, "CL", 30, "baseline"),
                     (9, "WML", 30, "baseline")]),
        "02": table([(1, "CL", 60, "enlarging"), (2, "CL", 10, "shrinking"), (3, "CL", 0, "disappeared"),
                     (4, "CL", 30, "new"), (9, "WML", 30, "stable")]),
        "03": table([(1, "CL", 60, "stable"), (2, "CL", 10, "stable"), (4, "CL", 30, "stable"),
                     (9, "WML", 30, "stable")]),
    }
    order = ["01", "02", "03"]
    # baseline -> last: the events of ses-02 count; 3 is gone, 4 is new since ses-01
    assert truth_classes(tables, "01", "03", order) == {1: "enlarging", 2: "shrinking",
                                                        3: "disappeared", 4: "new"}
    assert truth_classes(tables, "02", "03", order) == {1: "stable", 2: "stable", 4: "stable"}


def test_component_classes_take_the_majority_value():
    codes = np.zeros((8, 8, 8), np.uint8)
    codes[1:4, 1:4, 1:4] = CODES["stable"]
    codes[1, 1, 1] = CODES["enlarging"]  # one voxel of another class in the same component
    codes[6, 6, 6] = CODES["new"]
    codes[6, 1, 1] = CODES["disappeared"]  # not a later lesion: left out
    labels, n, classes = component_classes(codes, 26, [1, 2, 3, 4])
    assert n == 2 and classes == ["stable", "new"]
    assert labels[6, 1, 1] == 0


def test_confusion_table_rows_and_totals():
    table = confusion_table(["new", "new", "stable"], ["new", MISSED, "enlarging"], ["new"])
    table = table.set_index("truth_class")
    assert table.loc["new", "new"] == 1 and table.loc["new", MISSED] == 1
    assert table.loc["stable", "enlarging"] == 1 and table.loc[NO_TRUTH, "new"] == 1
    assert table["n"].tolist() == [2, 0, 1, 0, 0, 1]
