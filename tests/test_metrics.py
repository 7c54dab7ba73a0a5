"""Lesion-wise and voxel-wise metrics on small hand-made masks, checked against hand computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bids_cl.evaluation.metrics import (
    DETECTED,
    FN,
    FP,
    TP,
    USL,
    ZERO_DIVISIONS,
    LesionCounts,
    VoxelCounts,
    adjusted_iou,
    evaluate_masks,
    lesionwise_metrics,
    majority_partner,
    voxel_counts,
)
from bids_cl.utils.components import label_components, label_sizes, overlap_pairs

SHAPE = (6, 6, 14)  # 504 voxels


def empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=np.uint8)


def rod(z0: int, z1: int, x: int = 0) -> np.ndarray:
    """A 2x2 rod along z from z0 to z1 (exclusive) at x..x+2: 4 * (z1 - z0) voxels."""
    mask = empty()
    mask[x : x + 2, 0:2, z0:z1] = 1
    return mask


def test_exact_match() -> None:
    # GT = two rods (16 and 12 voxels, far apart); prediction identical.
    gt = rod(0, 4) | rod(8, 11, x=3)
    m = evaluate_masks(gt, gt)
    # 2 predicted lesions, each IoU_adj = 1 -> TP 2; both GT detected -> FN 0.
    assert (m["n_pred"], m["n_gt"], m["tp"], m["fp"], m["usl"], m["fn"]) == (2, 2, 2, 0, 0, 0)
    assert m["f1"] == m["recall"] == m["precision"] == 1.0
    assert m["usl_rate"] == 0.0
    assert m["dice"] == m["ndsc"] == m["voxel_tpr"] == 1.0
    assert m["voxel_fpr"] == m["voxel_fdr"] == 0.0


def test_one_gt_split_into_two_predictions() -> None:
    # GT G: rod z 0..10 = 40 voxels. Predictions P1: z 0..4 (16), P2: z 5..9 (16); the gap at
    # z = 4 keeps them apart. covered(G) = 32, uncovered(G) = 8.
    gt = rod(0, 10)
    pred = rod(0, 4) | rod(5, 9)
    match = lesionwise_metrics(pred, gt)
    # IoU_adj(P1) = |P1 ∩ K'| / |P1 ∪ K'| with K' = G \ P2 (24 voxels, contains P1) = 16/24 = 2/3.
    assert match.pred_iou_adj.tolist() == [pytest.approx(2 / 3), pytest.approx(2 / 3)]
    # Plain IoU(P1) = 16 / 40 = 0.4.
    assert match.pred_best_iou.tolist() == [pytest.approx(0.4), pytest.approx(0.4)]
    assert match.pred_verdict.tolist() == [TP, TP]
    assert match.gt_verdict.tolist() == [DETECTED]
    # F1 = 2*2 / (2*2 + 0 + 0 + 0) = 1: splitting is not penalised.
    counts = match.counts
    assert (counts.tp, counts.fp, counts.usl, counts.fn) == (2, 0, 0, 0)
    assert counts.f1() == 1.0 and counts.recall() == 1.0 and counts.precision() == 1.0
    # Voxel Dice = 2*32 / (32 + 40) = 8/9.
    assert voxel_counts(pred, gt).dice() == pytest.approx(8 / 9)
    # At threshold 0.5 the plain-IoU criterion calls both pieces USL (0.4 < 0.5); IoU_adj keeps TP.
    assert lesionwise_metrics(pred, gt, threshold=0.5).pred_verdict.tolist() == [TP, TP]
    by_iou = lesionwise_metrics(pred, gt, criterion="iou", threshold=0.5)
    assert by_iou.pred_verdict.tolist() == [USL, USL]
    # Then TP 0, USL 2, FN 0: F1 = 0 / (0 + 0 + 2 + 0) = 0; precision = 0/2; USL rate 2/2;
    # recall 0/0 -> 1 (paper), 0 (strict: the masks are not both empty).
    assert by_iou.counts.f1() == 0.0 and by_iou.counts.precision() == 0.0
    assert by_iou.counts.recall() == 1.0 and by_iou.counts.usl_rate() == 1.0
    assert by_iou.counts.recall("strict") == 0.0


def test_two_gts_merged_by_one_prediction() -> None:
    # GT G1: z 0..4 (16 voxels), G2: z 6..10 (16 voxels). Prediction P: z 0..10 (40 voxels).
    gt = rod(0, 4) | rod(6, 10)
    pred = rod(0, 10)
    match = lesionwise_metrics(pred, gt)
    # K = G1 ∪ G2 = 32 voxels, no other prediction: IoU_adj = 32 / 40 = 0.8 -> TP.
    assert match.pred_iou_adj.tolist() == [pytest.approx(0.8)]
    assert match.pred_verdict.tolist() == [TP]
    assert match.gt_verdict.tolist() == [DETECTED, DETECTED]
    assert match.gt_matched_by_tp.tolist() == [True, True]
    # TP 1 (predicted), FN 0: F1 = 2 / 2 = 1, recall = 1 / 1, precision = 1 / 1.
    counts = match.counts
    assert (counts.tp, counts.fp, counts.usl, counts.fn, counts.n_gt) == (1, 0, 0, 0, 2)
    assert counts.f1() == counts.recall() == counts.precision() == 1.0
    # Best single IoU = 16 / 40 = 0.4: TP at 0.25, USL at 0.5.
    assert lesionwise_metrics(pred, gt, criterion="iou").pred_verdict.tolist() == [TP]
    assert lesionwise_metrics(pred, gt, criterion="iou", threshold=0.5).pred_verdict.tolist() == [USL]
    verdicts = match.gt_verdicts()
    assert verdicts[1].pred_ids == (1,) and verdicts[2].pred_ids == (1,)
    assert match.pred_verdicts()[1].gt_ids == (1, 2)


def test_prediction_barely_touching_gt_is_usl() -> None:
    # GT: 3x3x3 cube at 0..3 (27 voxels); prediction: 2x2x2 cube at 2..4 (8 voxels); they share
    # the single voxel (2, 2, 2).
    gt, pred = empty(), empty()
    gt[0:3, 0:3, 0:3] = 1
    pred[2:4, 2:4, 2:4] = 1
    m = evaluate_masks(pred, gt)
    match = lesionwise_metrics(pred, gt)
    # IoU_adj = 1 / (|P| + uncovered(G)) = 1 / (8 + 26) = 1/34 < 0.25 -> USL; GT detected, not FN.
    assert match.pred_iou_adj[0] == pytest.approx(1 / 34)
    assert match.pred_verdict.tolist() == [USL]
    assert match.gt_verdict.tolist() == [DETECTED]
    assert (m["tp"], m["fp"], m["usl"], m["fn"]) == (0, 0, 1, 0)
    # F1 = 0 / (0 + 0 + 1 + 0) = 0; precision = 0 / 1 = 0; USL rate = 1 / 1;
    # recall = 0 / (0 + 0) is 0/0: 1 as the reference metrics.py gives (strict: 0).
    assert m["f1"] == 0.0 and m["precision"] == 0.0 and m["usl_rate"] == 1.0 and m["recall"] == 1.0
    assert evaluate_masks(pred, gt, zero_division="strict")["recall"] == 0.0
    # Dice = 2 * 1 / (8 + 27) = 2/35.
    assert m["dice"] == pytest.approx(2 / 35)
    # non_zero: any overlap is a TP -> TP 1, F1 = 2 / 2 = 1; its score is |P ∩ GT| / |P| = 1/8.
    nz = lesionwise_metrics(pred, gt, criterion="non_zero")
    assert nz.pred_verdict.tolist() == [TP] and nz.counts.f1() == 1.0
    assert nz.pred_score[0] == pytest.approx(1 / 8)


def test_mixed_tp_fp_fn() -> None:
    # GT: A = rod z 0..4 (x 0), B = rod z 8..12 (x 0). Prediction: A exactly, C = rod at x 3 z 8..12
    # (no GT there).
    gt = rod(0, 4) | rod(8, 12)
    pred = rod(0, 4) | rod(8, 12, x=3)
    m = evaluate_masks(pred, gt)
    # TP 1 (A), FP 1 (C), USL 0, FN 1 (B).
    assert (m["tp"], m["fp"], m["usl"], m["fn"]) == (1, 1, 0, 1)
    # F1 = 2 / (2 + 1 + 0 + 1) = 0.5; recall = 1 / 2; precision = 1 / 2.
    assert (m["f1"], m["recall"], m["precision"]) == (0.5, 0.5, 0.5)
    # Voxels: TP 16, FP 16, FN 16, N = 504: Dice = 32 / 64; TPR = 16 / 32;
    # FPR = 16 / (504 - 32); FDR = 16 / 32.
    assert m["dice"] == 0.5 and m["voxel_tpr"] == 0.5 and m["voxel_fdr"] == 0.5
    assert m["voxel_fpr"] == pytest.approx(16 / 472)
    match = lesionwise_metrics(pred, gt)
    assert match.pred_verdict.tolist() == [TP, FP]  # ids in raster order: A (x 0) before C (x 3)
    assert match.gt_verdict.tolist() == [DETECTED, FN]
    assert match.gt_verdicts()[2].voxels == 16


def test_empty_prediction() -> None:
    gt = rod(0, 4)
    m = evaluate_masks(empty(), gt)
    # TP 0, FP 0, USL 0, FN 1: F1 = 0 / 1 = 0; recall = 0 / 1 = 0; precision 0/0 with FN > 0
    # -> 0 and USL rate 0/0 with FN > 0 -> 1 (the reference metrics.py).
    assert (m["n_pred"], m["n_gt"], m["fn"]) == (0, 1, 1)
    assert m["f1"] == m["recall"] == m["precision"] == 0.0
    assert m["usl_rate"] == 1.0
    # Voxels: TP 0, FP 0, FN 16: Dice = 0 / 16; nDSC = 0 / (k*0 + 0 + 16); TPR = 0 / 16;
    # FPR = 0 / 488; FDR 0/0 -> 0.
    assert m["dice"] == m["ndsc"] == m["voxel_tpr"] == 0.0
    assert m["voxel_fpr"] == m["voxel_fdr"] == 0.0


def test_empty_gt() -> None:
    pred = rod(0, 4)
    m = evaluate_masks(pred, empty())
    # TP 0, FP 1: F1 = 0 / 1 = 0; precision = 0 / 1 = 0; recall 0/0 -> 1 (the reference
    # metrics.py), 0 under strict (a prediction, so not both empty).
    assert (m["n_pred"], m["n_gt"], m["fp"]) == (1, 0, 1)
    assert m["f1"] == m["precision"] == 0.0 and m["recall"] == 1.0
    assert evaluate_masks(pred, empty(), zero_division="strict")["recall"] == 0.0
    # Voxels: FP 16; k = 1 (empty GT): nDSC = 0 / (16 + 0 + 0) = 0; TPR 0/0 -> 0;
    # FPR = 16 / 504; FDR = 16 / 16.
    assert m["dice"] == m["ndsc"] == m["voxel_tpr"] == 0.0
    assert m["voxel_fpr"] == pytest.approx(16 / 504) and m["voxel_fdr"] == 1.0


def test_both_empty() -> None:
    m = evaluate_masks(empty(), empty())
    # Paper: F1 = 1, recall = 1; by the same rule precision, Dice, nDSC, TPR = 1; rates 0.
    assert m["f1"] == m["recall"] == m["precision"] == 1.0
    assert m["dice"] == m["ndsc"] == m["voxel_tpr"] == 1.0
    assert m["usl_rate"] == m["voxel_fpr"] == m["voxel_fdr"] == 0.0
    assert (m["n_pred"], m["n_gt"]) == (0, 0)


# (tp, fp, usl, fn, n_gt) -> (F1, recall paper, recall strict, precision, USL rate), by hand from
# F1 = 2TP / (2TP + FP + USL + FN), recall = TP / (TP + FN), precision = TP / (TP + FP + USL),
# USL rate = USL / (TP + FP + USL) and the 0/0 values of the reference metrics.py.
CONVENTION_CASES = {
    # 0/0 everywhere: F1 1, recall 1 (strict too: both empty), precision 1 and USL rate 0 (FN = 0).
    "both empty": ((0, 0, 0, 0, 0), (1.0, 1.0, 1.0, 1.0, 0.0)),
    # no prediction, FN 2: F1 0 / 2; recall 0 / 2; precision 0/0 with FN > 0 -> 0; USL 0/0 -> 1.
    "empty prediction": ((0, 0, 0, 2, 2), (0.0, 0.0, 0.0, 0.0, 1.0)),
    # no GT, 3 FPs: F1 0 / 3; recall 0/0 -> 1 (strict 0); precision 0 / 3; USL rate 0 / 3.
    "empty reference": ((0, 3, 0, 0, 0), (0.0, 1.0, 0.0, 0.0, 0.0)),
    # 2 GT lesions touched only by 2 USLs: F1 0 / 2; recall 0/0 -> 1 (strict 0); precision 0 / 2;
    # USL rate 2 / 2.
    "only poor overlaps": ((0, 0, 2, 0, 2), (0.0, 1.0, 0.0, 0.0, 1.0)),
    # TP 1, FP 1, USL 1, FN 1: F1 2 / (2 + 1 + 1 + 1) = 0.4; recall 1 / 2; precision 1 / 3;
    # USL rate 1 / 3 (no 0/0: both conventions agree).
    "defined": ((1, 1, 1, 1, 2), (0.4, 0.5, 0.5, 1 / 3, 1 / 3)),
}


@pytest.mark.parametrize("case", CONVENTION_CASES)
def test_zero_division_conventions(case: str) -> None:
    counts, (f1, recall_paper, recall_strict, precision, usl_rate) = CONVENTION_CASES[case]
    lesions = LesionCounts(*counts)
    assert lesions.f1() == pytest.approx(f1)
    assert lesions.recall() == lesions.recall("paper") == recall_paper  # paper is the default
    assert lesions.recall("strict") == recall_strict
    assert lesions.precision() == pytest.approx(precision)
    assert lesions.usl_rate() == pytest.approx(usl_rate)


def test_unknown_zero_division_is_rejected() -> None:
    with pytest.raises(ValueError):
        LesionCounts(0, 0, 0, 0, 0).recall("lenient")


def test_connectivity_corner_and_edge_neighbours() -> None:
    corner, edge = empty(), empty()
    corner[1, 1, 1] = corner[2, 2, 2] = 1  # share only a corner
    edge[1, 1, 1] = edge[2, 2, 1] = 1  # share an edge
    assert [label_components(corner, c)[1] for c in (6, 18, 26)] == [2, 2, 1]
    assert [label_components(edge, c)[1] for c in (6, 18, 26)] == [2, 1, 1]

    # GT = the corner pair, prediction = its first voxel only.
    pred = empty()
    pred[1, 1, 1] = 1
    # 26: one GT lesion of 2 voxels; IoU_adj = 1 / (1 + 1) = 0.5 -> TP; F1 = 2 / 2 = 1.
    m26 = evaluate_masks(pred, corner, connectivity=26)
    assert (m26["n_gt"], m26["tp"], m26["fn"], m26["f1"]) == (1, 1, 0, 1.0)
    # The threshold is inclusive: IoU_adj 0.5 >= 0.5 is still a TP.
    assert evaluate_masks(pred, corner, threshold=0.5)["tp"] == 1
    # 6: two GT lesions; the prediction matches one exactly (IoU_adj 1), the other is missed.
    # TP 1, FN 1: F1 = 2 / (2 + 1) = 2/3; recall = 1/2; precision = 1/1.
    m6 = evaluate_masks(pred, corner, connectivity=6)
    assert (m6["n_gt"], m6["tp"], m6["fn"]) == (2, 1, 1)
    assert m6["f1"] == pytest.approx(2 / 3) and m6["recall"] == 0.5 and m6["precision"] == 1.0


def test_ndsc_values() -> None:
    # 10x10x10 = 1000 voxels; GT 10 voxels; prediction 5 on GT + 5 off GT: TP 5, FP 5, FN 5.
    gt, pred = np.zeros((10, 10, 10)), np.zeros((10, 10, 10))
    gt[0, 0, 0:10] = 1
    pred[0, 0, 0:5] = 1
    pred[5, 5, 0:5] = 1
    counts = voxel_counts(pred, gt)
    assert (counts.tp, counts.fp, counts.fn, counts.n_voxels) == (5, 5, 5, 1000)
    # r = 0.001: k = 0.999 * 10 / (0.001 * 990) = 9.99 / 0.99; nDSC = 10 / (5k + 10 + 5).
    k = 9.99 / 0.99
    assert counts.ndsc_k() == pytest.approx(k)
    assert counts.ndsc() == pytest.approx(10 / (5 * k + 15))
    # r equal to the GT fraction (10 / 1000): k = 0.99 * 10 / (0.01 * 990) = 1, so nDSC = Dice = 0.5.
    assert counts.ndsc(r=0.01) == pytest.approx(0.5) and counts.dice() == 0.5


def test_criteria_and_threshold_validation() -> None:
    gt = rod(0, 4)
    with pytest.raises(ValueError):
        lesionwise_metrics(gt, gt, criterion="dice")
    with pytest.raises(ValueError):
        lesionwise_metrics(gt, gt, threshold=0.0)
    with pytest.raises(ValueError):
        lesionwise_metrics(gt, gt[:, :, :5])


def test_counts_vectorise_like_scalars() -> None:
    # Array fields (as in the bootstrap) give the same values as one image at a time.
    tp, fp, usl, fn, n_gt = [np.array(v) for v in ([0, 1, 0, 2], [0, 1, 2, 0], [0, 0, 1, 0],
                                                   [0, 1, 3, 0], [0, 2, 3, 2])]
    arrays = LesionCounts(tp, fp, usl, fn, n_gt)
    for i in range(4):
        one = LesionCounts(int(tp[i]), int(fp[i]), int(usl[i]), int(fn[i]), int(n_gt[i]))
        for name in ("f1", "precision", "usl_rate"):
            assert getattr(arrays, name)()[i] == getattr(one, name)()
        for convention in ZERO_DIVISIONS:
            assert arrays.recall(convention)[i] == one.recall(convention)
    voxels = VoxelCounts(np.array([0, 3]), np.array([0, 1]), np.array([0, 2]), np.array([10, 10]))
    assert voxels.dice().tolist() == [1.0, 6 / 9]


def test_overlap_pairs_and_majority() -> None:
    a = np.zeros((1, 1, 8), dtype=np.int32)  # overlap_pairs: bids_cl.utils.components
    b = np.zeros_like(a)
    a[0, 0] = [1, 1, 1, 0, 2, 2, 0, 0]
    b[0, 0] = [3, 3, 5, 5, 5, 0, 1, 0]
    pairs = overlap_pairs(a, b)
    # Overlaps: (1,3) x2, (1,5) x1, (2,5) x1.
    assert list(zip(pairs.a_id.tolist(), pairs.b_id.tolist(), pairs.voxels.tolist(), strict=True)) == [
        (1, 3, 2), (1, 5, 1), (2, 5, 1)]
    best, voxels = majority_partner(pairs, 3)
    assert best.tolist() == [3, 5, 0] and voxels.tolist() == [2, 1, 0]


def _adjusted_iou_by_definition(pred_labels: np.ndarray, gt_labels: np.ndarray, p: int) -> float:
    """IoU_adj of predicted lesion p straight from the definition, with whole-volume masks."""
    lesion = pred_labels == p
    touched = np.unique(gt_labels[lesion & (gt_labels > 0)])
    if touched.size == 0:
        return 0.0
    union_k = np.isin(gt_labels, touched)
    k_adjusted = union_k & ~((pred_labels > 0) & ~lesion)
    return (lesion & k_adjusted).sum() / (lesion | k_adjusted).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjusted_iou_matches_definition_on_random_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = rng.random((12, 12, 12)) < 0.12
    gt = rng.random((12, 12, 12)) < 0.12
    pred_labels, n_pred = label_components(pred, 6)
    gt_labels, n_gt = label_components(gt, 6)
    fast = adjusted_iou(
        overlap_pairs(pred_labels, gt_labels),
        label_sizes(pred_labels, n_pred),
        label_sizes(gt_labels, n_gt),
    )
    slow = [_adjusted_iou_by_definition(pred_labels, gt_labels, p) for p in range(1, n_pred + 1)]
    assert n_pred > 20
    np.testing.assert_allclose(fast, slow)


def test_memory_layout_does_not_change_results() -> None:
    # NIfTI arrays are Fortran-ordered; ids and verdicts must not depend on the memory layout.
    rng = np.random.default_rng(3)
    pred = rng.random((9, 10, 11)) < 0.15
    gt = rng.random((9, 10, 11)) < 0.15
    c_order = lesionwise_metrics(pred, gt)
    f_order = lesionwise_metrics(np.asfortranarray(pred), np.asfortranarray(gt))
    assert c_order.pred_verdict.tolist() == f_order.pred_verdict.tolist()
    np.testing.assert_array_equal(c_order.pred_iou_adj, f_order.pred_iou_adj)
    a, _ = label_components(pred)
    b, _ = label_components(gt)
    pairs_c = overlap_pairs(a, b)
    pairs_f = overlap_pairs(np.asfortranarray(a), np.asfortranarray(b))
    np.testing.assert_array_equal(pairs_c.voxels, pairs_f.voxels)
    np.testing.assert_array_equal(pairs_c.a_id, pairs_f.a_id)


def _reference_scores_by_definition(pred: np.ndarray, gt: np.ndarray) -> list[float]:
    """F1, recall, precision, USL rate, DSC, nDSC straight from paper.md section 4 (one lesion at a
    time on whole-volume masks, 26-connectivity, IoU_adj threshold 0.25, r = 0.001)."""
    pred_labels, n_pred = label_components(pred, 26)
    gt_labels, n_gt = label_components(gt, 26)
    verdicts = []
    for p in range(1, n_pred + 1):
        iou = _adjusted_iou_by_definition(pred_labels, gt_labels, p)
        verdicts.append("TPL" if iou >= 0.25 else "USL" if iou > 0 else "FPL")
    tpl, fpl, usl = (verdicts.count(v) for v in ("TPL", "FPL", "USL"))
    fnl = sum(not (pred[gt_labels == g] > 0).any() for g in range(1, n_gt + 1))
    f1 = 2 * tpl / (2 * tpl + fpl + usl + fnl) if 2 * tpl + fpl + usl + fnl else 1.0
    recall = tpl / (tpl + fnl) if tpl + fnl else 1.0
    n_predicted = tpl + fpl + usl
    precision = tpl / n_predicted if n_predicted else (1.0 if fnl == 0 else 0.0)
    usl_rate = usl / n_predicted if n_predicted else (0.0 if fnl == 0 else 1.0)
    a, b = pred > 0, gt > 0
    tp, fp, fn, n = (a & b).sum(), (a & ~b).sum(), (~a & b).sum(), a.size
    dice = 2 * tp / (a.sum() + b.sum()) if a.sum() + b.sum() else 1.0
    k = 1.0 if b.sum() in (0, n) else 0.999 * b.sum() / (0.001 * (n - b.sum()))
    ndsc = 2 * tp / (k * fp + 2 * tp + fn) if a.sum() + b.sum() else 1.0
    return [f1, recall, precision, usl_rate, dice, ndsc]


@pytest.mark.parametrize("seed", range(6))
def test_scores_match_the_definitions_on_random_masks(seed: int) -> None:
    # Random blob lesions, a prediction made of shifted, thinned copies plus specks (TP, USL, FP
    # and FN all occur; seed 4 has USLs only, TP + FN = 0), and the empty combinations, against
    # the prose definitions evaluated lesion by lesion.
    rng = np.random.default_rng(seed)
    gt = ndimage.binary_dilation(rng.random((12, 12, 12)) < 0.012)
    pred = np.roll(gt, seed % 3, axis=seed % 3) & (rng.random(gt.shape) < 0.7)
    pred |= rng.random(gt.shape) < 0.004
    none = np.zeros_like(gt)
    for p, g in ((pred, gt), (gt, pred), (pred, none), (none, gt), (none, none)):
        m = evaluate_masks(p, g)
        got = [m[k] for k in ("f1", "recall", "precision", "usl_rate", "dice", "ndsc")]
        assert got == pytest.approx(_reference_scores_by_definition(p, g), abs=1e-12)
