"""bids_cl-evaluate on a tiny predictions folder and phantom-style reference (20³ images)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_cl.evaluation.cli import main

SHAPE = (20, 20, 20)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8 if data.max() < 256 else np.int32), affine), path)
    return path


def cube(data: np.ndarray, corner: tuple[int, int, int], size: int, value: int = 1) -> np.ndarray:
    i, j, k = corner
    data[i : i + size, j : j + size, k : k + size] = value
    return data


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Path]:
    """Phantom raw root with participants.tsv, its manual_masks, and a bids_cl output folder.

    sub-01 (3 T): truth lesions 1 = leukocortical CL (cube 3 at 2,2,2), 2 = intracortical CL
      (cube 2 at 12,2,2), 3 = WML (cube 3 at 2,12,12). Prediction: lesion 1 exactly (TP),
      lesion 2 missed (FN), a cube on the WML (FP on a distractor), a cube at 14,14,14 (FP).
    sub-02 (7 T): one CL (cube 3 at 5,5,5); prediction identical, but the reference is stored on a
      24³ grid shifted by 2 voxels, so it must be resampled.
    sub-03: prediction without reference. sub-04: reference without prediction.
    """
    raw = tmp_path / "phantom"
    ref = raw / "derivatives" / "manual_masks"
    out = tmp_path / "out"
    raw.mkdir()
    (raw / "participants.tsv").write_text(
        "participant_id\tsite\tfield_strength\n"
        "sub-01\tA\t3\nsub-02\tB\t7\nsub-03\tA\t3\nsub-04\tB\t7\n"
    )

    # sub-01 truth and prediction
    anat = ref / "sub-01" / "ses-01" / "anat"
    prefix = "sub-01_ses-01"
    dseg = np.zeros(SHAPE, dtype=np.int32)
    cube(dseg, (2, 2, 2), 3, 1)
    cube(dseg, (12, 2, 2), 2, 2)
    cube(dseg, (2, 12, 12), 3, 3)
    save(anat / f"{prefix}_desc-lesions_dseg.nii.gz", dseg)
    save(anat / f"{prefix}_label-CL_mask.nii.gz", (dseg == 1) | (dseg == 2))
    save(anat / f"{prefix}_label-WML_mask.nii.gz", dseg == 3)
    pd.DataFrame({
        "lesion_id": [1, 2, 3],
        "type": ["leukocortical", "intracortical", "periventricular"],
        "label": ["CL", "CL", "WML"],
        "volume_ul": [27.0, 8.0, 27.0],
    }).to_csv(anat / f"{prefix}_desc-lesions_stats.tsv", sep="\t", index=False)
    pred = cube(np.zeros(SHAPE), (2, 2, 2), 3)
    cube(pred, (3, 13, 13), 1)
    cube(pred, (14, 14, 14), 2)
    out_anat = out / "sub-01" / "ses-01" / "anat"
    save(out_anat / f"{prefix}_label-CL_mask.nii.gz", pred)
    save(out_anat / f"{prefix}_space-MNI152NLin2009cAsym_label-CL_mask.nii.gz", pred)  # ignored
    (out_anat / f"{prefix}_label-CL_desc-summary_stats.json").write_text(
        json.dumps({"FieldStrength": 3.0, "Sequence": "MP2RAGE", "LesionCount": 3})
    )

    # sub-02: same lesion, reference on a shifted, larger grid
    lesion = cube(np.zeros(SHAPE), (5, 5, 5), 3)
    out_anat2 = out / "sub-02" / "ses-01" / "anat"
    save(out_anat2 / "sub-02_ses-01_label-CL_mask.nii.gz", lesion)
    (out_anat2 / "sub-02_ses-01_label-CL_desc-summary_stats.json").write_text(
        json.dumps({"FieldStrength": 7.0, "Sequence": "MP2RAGE"})
    )
    shifted = np.zeros((24, 24, 24))
    shifted[2:22, 2:22, 2:22] = lesion  # ref voxel i + 2 is prediction voxel i
    ref_affine = AFFINE.copy()
    ref_affine[:3, 3] = -2.0
    save(ref / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_label-CL_mask.nii.gz", shifted,
         ref_affine)

    # unpaired files
    save(out / "sub-03" / "anat" / "sub-03_label-CL_mask.nii.gz", lesion)
    save(ref / "sub-04" / "anat" / "sub-04_label-CL_mask.nii.gz", lesion)
    return {"raw": raw, "ref": ref, "out": out}


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"])


def test_evaluate_end_to_end(dataset: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(dataset["out"]), "--reference", str(dataset["ref"]),
                 "--by", "site", "field_strength", "--bootstrap", "50", "--seed", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    eval_dir = dataset["out"] / "evaluation"
    assert "resampled" in captured.err and "sub-02_ses-01" in captured.err
    assert "sub-03: no reference" in captured.out and "sub-04: no prediction" in captured.out
    assert "f1" in captured.out

    missing = read_tsv(eval_dir / "missing_pairs.tsv")
    assert missing[["prefix", "missing"]].values.tolist() == [
        ["sub-03", "reference"], ["sub-04", "prediction"]]

    images = read_tsv(eval_dir / "images.tsv").set_index("prefix")
    assert list(images.index) == ["sub-01_ses-01", "sub-02_ses-01"]
    one, two = images.loc["sub-01_ses-01"], images.loc["sub-02_ses-01"]
    # sub-01: predicted 3 (TP 1, FP 2), GT 2 (FN 1): F1 = 2/(2+2+0+1) = 0.4, recall 1/2,
    # precision 1/3; voxel TP 27, FP 1 + 8, FN 8: Dice = 54 / (54 + 9 + 8).
    assert (one.tp, one.fp, one.usl, one.fn, one.n_gt, one.n_pred) == (1, 2, 0, 1, 2, 3)
    assert one.f1 == pytest.approx(0.4) and one.recall == 0.5
    assert one.precision == pytest.approx(1 / 3, abs=1e-6)
    assert one.dice == pytest.approx(54 / 71, abs=1e-6)
    # The WML lesion is touched by a prediction that touches no CL: called CL.
    assert (one.wml_lesions, one.wml_called_cl, one.wml_called_cl_rate, one.pred_on_wml) == (
        1, 1, 1.0, 1)
    assert one.field_strength == 3 and one.sequence == "MP2RAGE" and one.site == "A"
    # sub-02: after resampling, an exact match.
    assert (two.tp, two.fp, two.fn, two.f1, two.dice) == (1, 0, 0, 1.0, 1.0)
    assert bool(two.resampled) and two.field_strength == 7 and pd.isna(two.wml_lesions)

    lesions = read_tsv(eval_dir / "lesions.tsv")
    sub1 = lesions[lesions.prefix == "sub-01_ses-01"]
    pred = sub1[sub1.source == "prediction"].set_index("lesion_id")
    gt = sub1[sub1.source == "reference"].set_index("lesion_id")
    # Prediction ids in raster order: cube at (2,2,2), WML cube at (3,13,13), FP at (14,14,14).
    assert pred.verdict.tolist() == ["TP", "FP", "FP"]
    assert pred.on_wml.tolist() == [False, True, False]
    assert pred.type.tolist() == ["leukocortical", "periventricular", "none"]
    assert pred.loc[1, "iou_adj"] == 1.0 and pred.loc[1, "volume_ul"] == 27.0
    assert gt.verdict.tolist() == ["detected", "FN"]
    assert gt.type.tolist() == ["leukocortical", "intracortical"]
    assert gt.truth_id.tolist() == [1, 2] and gt.voxels.tolist() == [27, 8]
    assert gt.loc[1, "centroid_i"] == 3.0

    aggregate = read_tsv(eval_dir / "aggregate.tsv").set_index("metric")
    # mean F1 = (0.4 + 1) / 2; pooled: TP 2, FP 2, USL 0, FN 1 -> 4 / (4 + 2 + 1) = 4/7.
    assert aggregate.loc["f1", "mean"] == pytest.approx(0.7)
    assert aggregate.loc["f1", "pooled"] == pytest.approx(4 / 7, abs=1e-6)
    assert aggregate.loc["tp", "pooled"] == 2 and aggregate.loc["fn", "pooled"] == 1
    low, high = aggregate.loc["f1", ["mean_ci_low", "mean_ci_high"]]
    assert 0.4 <= low <= 0.7 <= high <= 1.0
    assert aggregate.loc["wml_called_cl_rate", "n_images"] == 1

    groups = read_tsv(eval_dir / "by_group.tsv")
    f1 = groups[groups.metric == "f1"].set_index(["by", "group"])["mean"]
    assert f1[("site", "A")] == pytest.approx(0.4) and f1[("field_strength", "7")] == 1.0

    types = read_tsv(eval_dir / "by_type.tsv").set_index("type")
    assert types.loc["intracortical", "gt_fn"] == 1 and types.loc["leukocortical", "gt_detected"] == 1
    sizes = read_tsv(eval_dir / "by_size.tsv").set_index("size_bin_ul")
    # GT volumes 27, 8 (sub-01) and 27 (sub-02) µL; bins <10, 10-25, 25-50, ...
    assert sizes.loc["<10", "n_gt"] == 1 and sizes.loc["25-50", "n_gt"] == 2
    assert sizes["n_pred"].sum() == 4

    html = (eval_dir / "summary.html").read_text()
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    settings = json.loads((eval_dir / "settings.json").read_text())
    assert settings["Criterion"] == "iou_adj" and settings["MissingPairs"] == 2


def test_criterion_and_output_dir(dataset: dict[str, Path], tmp_path: Path) -> None:
    eval_dir = tmp_path / "elsewhere"
    code = main([str(dataset["out"]), "--reference", str(dataset["ref"]), "--criterion", "non_zero",
                 "--connectivity", "6", "--bootstrap", "0", "-o", str(eval_dir)])
    assert code == 0
    aggregate = read_tsv(eval_dir / "aggregate.tsv").set_index("metric")
    assert aggregate.loc["tp", "pooled"] == 2 and pd.isna(aggregate.loc["f1", "mean_ci_low"])
    assert not (dataset["out"] / "evaluation").exists()


def test_errors(dataset: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, ref = str(dataset["out"]), str(dataset["ref"])
    assert main([out, "--reference", str(tmp_path / "nowhere")]) == 66
    assert main([str(tmp_path / "no_out"), "--reference", ref]) == 66
    (tmp_path / "empty_out").mkdir()
    assert main([str(tmp_path / "empty_out"), "--reference", ref]) == 66
    assert main([out, "--reference", ref, "--threshold", "1.5"]) == 64
    assert main([out, "--reference", ref, "--by", "handedness"]) == 64
    assert main([out, "--reference", ref, "--criterion", "dice"]) == 64
    assert main([out]) == 64
    assert main([out, "--reference", ref, "--label", "XYZ"]) == 66  # no pair at all
    err = capsys.readouterr().err
    assert all(line.startswith("bids_cl-evaluate: error: ") for line in err.strip().splitlines())

    broken = dataset["out"] / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_label-CL_mask.nii.gz"
    broken.write_bytes(b"not a nifti")
    assert main([out, "--reference", ref, "--bootstrap", "0"]) == 65
    assert "cannot read NIfTI" in capsys.readouterr().err


def test_console_command(dataset: dict[str, Path], tmp_path: Path) -> None:
    script = shutil.which("bids_cl-evaluate", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "bids_cl.evaluation.cli"]
    eval_dir = tmp_path / "eval"
    result = subprocess.run(
        [*command, str(dataset["out"]), "--reference", str(dataset["ref"]),
         "--bootstrap", "20", "-o", str(eval_dir)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    assert (eval_dir / "images.tsv").is_file() and "sub-04: no prediction" in result.stdout
    failed = subprocess.run([*command, str(tmp_path / "missing"), "--reference", "x"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 66 and failed.stderr.startswith("bids_cl-evaluate: error:")


# ------------------------------------------------------------------------------------------------
# The reference metrics.py's numbers, case by case (../shared/reference/paper.md, section 4)
# ------------------------------------------------------------------------------------------------

GRID = (10, 10, 10)  # N = 1000 voxels; nDSC with r = 0.001: k = 0.999 |GT| / (0.001 (1000 - |GT|))
A = np.s_[1:3, 1:3, 1:3]  # 8 voxels
C = np.s_[6:8, 6:8, 6:8]  # 8 voxels, apart from A
METRICS = ("f1", "recall", "precision", "usl_rate", "dice", "ndsc")

# name: (predicted boxes, reference boxes, expected F1, recall, precision, USL rate, DSC, nDSC,
# recall under --zero-division strict). Lesion counts use iou_adj >= 0.25, 26-connectivity.
REFERENCE_CASES: dict[str, tuple[list[tuple[slice, ...]], list[tuple[slice, ...]],
                                 tuple[float, ...], float]] = {
    # TP 1: F1 = 2/2, recall 1/1, precision 1/1, USL 0/1; voxels TP 8, FP 0, FN 0: DSC = nDSC = 16/16.
    "exact": ([A], [A], (1.0, 1.0, 1.0, 0.0, 1.0, 1.0), 1.0),
    # 27-voxel cube shifted one voxel along i: overlap 2*3*3 = 18; IoU_adj = 18 / (27 + 9) = 0.5
    # -> TP: F1 = recall = precision = 1, USL 0. DSC = 36 / 54; k = 0.999*27 / (0.001*973)
    # = 27.72148: nDSC = 36 / (9k + 36 + 9) = 0.12224386.
    "shifted": ([np.s_[2:5, 1:4, 1:4]], [np.s_[1:4, 1:4, 1:4]],
                (1.0, 1.0, 1.0, 0.0, 0.66666667, 0.12224386), 1.0),
    # One 40-voxel rod, predicted as two 16-voxel pieces: IoU_adj = 16 / (16 + 8) each -> TP 2,
    # FN 0: F1 = 4/4, recall 2/2, precision 2/2, USL 0. DSC = 64 / 72 = nDSC (FP 0).
    "split": ([np.s_[1:3, 1:3, 0:4], np.s_[1:3, 1:3, 5:9]], [np.s_[1:3, 1:3, 0:10]],
              (1.0, 1.0, 1.0, 0.0, 0.88888889, 0.88888889), 1.0),
    # Two 16-voxel rods merged by one 40-voxel prediction: IoU_adj = 32 / 40 -> TP 1, FN 0:
    # F1 = 2/2, recall 1/1, precision 1/1. DSC = 64 / 72; k = 0.999*32 / (0.001*968) = 33.02479:
    # nDSC = 64 / (8k + 64) = 0.19500403.
    "merged": ([np.s_[1:3, 1:3, 0:10]], [np.s_[1:3, 1:3, 0:4], np.s_[1:3, 1:3, 6:10]],
               (1.0, 1.0, 1.0, 0.0, 0.88888889, 0.19500403), 1.0),
    # TP 1, FN 1: F1 = 2 / (2 + 1) , recall 1/2, precision 1/1, USL 0. DSC = 16/24 = nDSC (FP 0).
    "missed": ([A], [A, C], (0.66666667, 0.5, 1.0, 0.0, 0.66666667, 0.66666667), 0.5),
    # TP 1, FP 1: F1 = 2 / (2 + 1), recall 1/1, precision 1/2, USL 0/2. DSC = 16 / 24;
    # k = 0.999*8 / (0.001*992) = 8.05645: nDSC = 16 / (8k + 16) = 0.19887731.
    "spurious": ([A, C], [A], (0.66666667, 1.0, 0.5, 0.0, 0.66666667, 0.19887731), 1.0),
    # FN 1, nothing predicted: F1 = 0/1, recall 0/1; precision 0 and USL rate 1 (0/0 with FN > 0).
    # DSC = 0/8, nDSC = 0 / (0 + 0 + 8).
    "emptypred": ([], [A], (0.0, 0.0, 0.0, 1.0, 0.0, 0.0), 0.0),
    # FP 1, no reference lesion: F1 = 0/1, recall 0/0 -> 1 (strict: 0), precision 0/1, USL 0/1.
    # DSC = 0/8; k = 1 (empty GT): nDSC = 0 / 8.
    "emptyref": ([A], [], (0.0, 1.0, 0.0, 0.0, 0.0, 0.0), 0.0),
    # Everything 0/0: F1 1, recall 1, precision 1 and USL rate 0 (FN = 0), DSC = nDSC = 1.
    "bothempty": ([], [], (1.0, 1.0, 1.0, 0.0, 1.0, 1.0), 1.0),
    # Two 27-voxel lesions, each touched at one voxel by an 8-voxel prediction: IoU_adj
    # = 1 / (8 + 26) < 0.25 -> USL 2, TP 0, FN 0: F1 = 0/2, recall 0/0 -> 1 (strict: 0),
    # precision 0/2, USL rate 2/2. Voxels TP 2, FP 14, FN 52: DSC = 4 / 70;
    # k = 0.999*54 / (0.001*946) = 57.02537: nDSC = 4 / (14k + 4 + 52) = 0.00468189.
    "poor": ([np.s_[2:4, 2:4, 2:4], np.s_[8:10, 8:10, 8:10]],
             [np.s_[0:3, 0:3, 0:3], np.s_[6:9, 6:9, 6:9]],
             (0.0, 1.0, 0.0, 1.0, 0.05714286, 0.00468189), 0.0),
}


def blocks(boxes: list[tuple[slice, ...]]) -> np.ndarray:
    mask = np.zeros(GRID, np.uint8)
    for box in boxes:
        mask[box] = 1
    return mask


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_metrics_equal_the_reference_per_image(case: str) -> None:
    from bids_cl.evaluation.metrics import evaluate_masks

    pred_boxes, ref_boxes, expected, strict_recall = REFERENCE_CASES[case]
    pred, ref = blocks(pred_boxes), blocks(ref_boxes)
    got = evaluate_masks(pred, ref)
    assert [got[m] for m in METRICS] == pytest.approx(list(expected), abs=1e-8)
    strict = evaluate_masks(pred, ref, zero_division="strict")
    assert strict["recall"] == strict_recall
    assert {m: strict[m] for m in METRICS if m != "recall"} == {
        m: got[m] for m in METRICS if m != "recall"}


@pytest.fixture
def reference_cases(tmp_path: Path) -> dict[str, Path]:
    """One participant per case, as NIfTIs in bids_cl-evaluate's layout (output / reference)."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    for case, (pred_boxes, ref_boxes, _, _) in REFERENCE_CASES.items():
        save(out / f"sub-{case}" / "anat" / f"sub-{case}_label-CL_mask.nii.gz", blocks(pred_boxes))
        save(ref / f"sub-{case}" / "anat" / f"sub-{case}_label-CL_mask.nii.gz", blocks(ref_boxes))
    return {"out": out, "ref": ref}


def test_evaluate_cli_gives_the_reference_numbers(reference_cases: dict[str, Path],
                                                  tmp_path: Path) -> None:
    out, ref = str(reference_cases["out"]), str(reference_cases["ref"])
    base = [out, "--reference", ref, "--by", "participant_id", "--bootstrap", "40"]
    assert main([*base, "-o", str(tmp_path / "paper")]) == 0
    assert main([*base, "--zero-division", "strict", "-o", str(tmp_path / "strict")]) == 0

    for convention in ("paper", "strict"):
        eval_dir = tmp_path / convention
        settings = json.loads((eval_dir / "settings.json").read_text())
        assert settings["ZeroDivision"] == convention  # the sidecar names the convention
        assert "recall" in settings["ZeroDivisionRule"]
        images = read_tsv(eval_dir / "images.tsv").set_index("participant_id")
        assert len(images) == len(REFERENCE_CASES)
        for case, (_, _, expected, strict_recall) in REFERENCE_CASES.items():
            row = images.loc[f"sub-{case}"]
            values = list(expected)
            if convention == "strict":
                values[METRICS.index("recall")] = strict_recall
            # images.tsv keeps 6 significant digits
            assert [row[m] for m in METRICS] == pytest.approx(values, rel=1e-5, abs=1e-9), case

    paper = read_tsv(tmp_path / "paper" / "aggregate.tsv").set_index("metric")
    strict = read_tsv(tmp_path / "strict" / "aggregate.tsv").set_index("metric")
    # Mean recall over the 10 images: (1+1+1+1+0.5+1+0+1+1+1) / 10 = 0.85; strict sets emptyref
    # and poor to 0: 6.5 / 10 = 0.65. Mean USL rate: (1 + 1) / 10 = 0.2 under both.
    assert paper.loc["recall", "mean"] == pytest.approx(0.85)
    assert strict.loc["recall", "mean"] == pytest.approx(0.65)
    assert paper.loc["usl_rate", "mean"] == strict.loc["usl_rate", "mean"] == pytest.approx(0.2)
    # Pooled: TP 1+1+2+1+1+1 = 7, FP 1+1 = 2, USL 2, FN 1+1 = 2: F1 = 14 / (14 + 2 + 2 + 2) = 0.7,
    # recall 7 / 9 (no 0/0 once pooled: both conventions agree).
    assert paper.loc["f1", "pooled"] == strict.loc["f1", "pooled"] == pytest.approx(0.7)
    assert paper.loc["recall", "pooled"] == pytest.approx(7 / 9, rel=1e-5)
    assert strict.loc["recall", "pooled"] == pytest.approx(7 / 9, rel=1e-5)

    # Per participant (one image each), pooled counts and every bootstrap resample keep the 0/0:
    # TP + FN = 0 gives recall 1 (paper) or 0 (strict) for mean, pooled and both CI ends.
    columns = ["mean", "mean_ci_low", "mean_ci_high", "pooled", "pooled_ci_low", "pooled_ci_high"]
    for convention, value in (("paper", 1.0), ("strict", 0.0)):
        groups = read_tsv(tmp_path / convention / "by_group.tsv")
        recall = groups[groups.metric == "recall"].set_index("group")
        for case in ("emptyref", "poor"):
            assert recall.loc[f"sub-{case}", columns].tolist() == [value] * 6, (convention, case)
        # No prediction but a missed lesion: USL rate 1 under both conventions, pooled too.
        usl = groups[groups.metric == "usl_rate"].set_index("group")
        assert usl.loc["sub-emptypred", columns].tolist() == [1.0] * 6


def test_unknown_zero_division_is_a_usage_error(reference_cases: dict[str, Path]) -> None:
    assert main([str(reference_cases["out"]), "--reference", str(reference_cases["ref"]),
                 "--zero-division", "lenient"]) == 64
