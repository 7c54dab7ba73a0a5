"""Lesion-wise and voxel-wise segmentation metrics on binary masks (pure numpy/scipy).

The definitions follow the paper's evaluation (docs/evaluation.md has them in full):

* lesions are connected components (6-, 18- or 26-connectivity; default 26);
* a predicted lesion P is scored against the union K of the ground-truth (GT) lesions it
  overlaps, after removing from K the voxels covered by *other* predicted lesions (adjusted IoU);
  it is a true positive (TP) when the score reaches the threshold, an under-segmented lesion (USL)
  when it overlaps GT but scores below, and a false positive (FP) when it overlaps no GT voxel;
* a GT lesion is a false negative (FN) only when no predicted voxel overlaps it.

Everything is computed from one labelling per mask and the voxel counts of the (pred id, GT id)
pairs of overlapping voxels (bids_cl.utils.components), so the cost is a few whole-volume passes
whatever the lesion count.

Undefined ratios (0/0) follow a named convention (``zero_division``):

* ``paper`` (default), the reference metrics.py: F1 = 1 (both masks empty), recall = 1 (no TP and
  no FN: GT empty, or every GT lesion touched only by USLs), precision = 1 if FN = 0 else 0 and
  USL rate = 0 if FN = 0 else 1 (no predicted lesion);
* ``strict``: a 0/0 is perfect only when both masks are empty, otherwise the worst value; it
  differs from ``paper`` in recall only (0 instead of 1 unless both masks are empty).

Dice and nDSC are 1 when both masks are empty (both conventions, as the reference). Voxel TPR,
FPR and FDR, which the reference leaves undefined (NaN) there, are 1 / 0 / 0 when both masks are
empty; otherwise TPR without GT is 0, FPR with GT filling the image is 0, FDR without prediction 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bids_cl.utils.components import (
    DEFAULT_CONNECTIVITY,
    OverlapPairs,
    best_iou,
    label_components,
    label_sizes,
    overlap_pairs,
)

Number = float | np.ndarray  # scores take scalars, or arrays (one value per bootstrap resample)

CRITERIA: tuple[str, ...] = ("iou_adj", "iou", "non_zero")
DEFAULT_CRITERION = "iou_adj"
DEFAULT_THRESHOLD = 0.25
DEFAULT_NDSC_R = 0.001
# The 0/0 conventions of the lesion-wise scores, and what each gives (written to settings.json).
ZERO_DIVISION_RULES: dict[str, str] = {
    "paper": "the reference metrics.py: F1 = 1 when both masks are empty; recall = 1 when "
             "TP + FN = 0; without predicted lesion, precision = 1 and USL rate = 0 if FN = 0, "
             "else precision = 0 and USL rate = 1",
    "strict": "as paper, except recall = 0 when TP + FN = 0 unless both masks are empty",
}
ZERO_DIVISIONS: tuple[str, ...] = tuple(ZERO_DIVISION_RULES)
DEFAULT_ZERO_DIVISION = "paper"

# Verdict strings used in the per-lesion tables.
TP, FP, USL = "TP", "FP", "USL"
DETECTED, FN = "detected", "FN"


# ------------------------------------------------------------------------------------------------
# Overlap counting (labelling, sizes, pair counts and plain IoU: bids_cl.utils.components)
# ------------------------------------------------------------------------------------------------


def majority_partner(pairs: OverlapPairs, n_a: int) -> tuple[np.ndarray, np.ndarray]:
    """For each a id 1..n_a, the b id it overlaps most (0 if none) and that overlap's voxel count.

    Ties go to the smaller b id, so the result does not depend on pair order.
    """
    best_id = np.zeros(n_a, dtype=np.int64)
    best_voxels = np.zeros(n_a, dtype=np.int64)
    if len(pairs) == 0:
        return best_id, best_voxels
    # Sort by a, then by descending count, then ascending b: the first row of each a is its winner.
    order = np.lexsort((pairs.b_id, -pairs.voxels, pairs.a_id))
    a_sorted = pairs.a_id[order]
    first = np.ones(a_sorted.size, dtype=bool)
    first[1:] = a_sorted[1:] != a_sorted[:-1]
    winners = order[first]
    best_id[pairs.a_id[winners] - 1] = pairs.b_id[winners]
    best_voxels[pairs.a_id[winners] - 1] = pairs.voxels[winners]
    return best_id, best_voxels


# ------------------------------------------------------------------------------------------------
# Ratios with the empty-mask conventions
# ------------------------------------------------------------------------------------------------


def safe_ratio(numerator: Number, denominator: Number, undefined: Number) -> Number:
    """numerator / denominator, with `undefined` where the denominator is 0 (scalars or arrays)."""
    num = np.asarray(numerator, dtype=float)
    den = np.asarray(denominator, dtype=float)
    fallback = np.broadcast_to(np.asarray(undefined, dtype=float), np.broadcast(num, den).shape)
    out = np.array(fallback, dtype=float)
    np.divide(num, den, out=out, where=den > 0)
    return _as_number(out)


def _as_number(values: np.ndarray) -> Number:
    """A 0-d result as a Python float, anything else unchanged (scalar and array use alike)."""
    return float(values) if np.ndim(values) == 0 else values


def _score_if_undefined(both_empty: Number) -> Number:
    """Value of an undefined higher-is-better score: perfect (1) only when both masks are empty."""
    return _as_number(np.where(np.asarray(both_empty, dtype=bool), 1.0, 0.0))


def check_zero_division(zero_division: str) -> str:
    """The name of a 0/0 convention (`ZERO_DIVISIONS`); ValueError for any other."""
    if zero_division not in ZERO_DIVISIONS:
        raise ValueError(f"zero_division must be one of {ZERO_DIVISIONS}, got {zero_division!r}")
    return zero_division


@dataclass(frozen=True)
class LesionCounts:
    """Lesion counts of one image, or summed over images (fields may be arrays for the bootstrap).

    tp, fp, usl count predicted lesions; fn and n_gt count GT lesions. The 0/0 cases follow
    ``zero_division`` (module docstring); F1 and precision are the same under both conventions.
    """

    tp: Number
    fp: Number
    usl: Number
    fn: Number
    n_gt: Number

    def __add__(self, other: LesionCounts) -> LesionCounts:
        """Counts pooled over two sets of images (field by field)."""
        return LesionCounts(tp=self.tp + other.tp, fp=self.fp + other.fp, usl=self.usl + other.usl,
                            fn=self.fn + other.fn, n_gt=self.n_gt + other.n_gt)

    @property
    def n_pred(self) -> Number:
        return np.asarray(self.tp) + np.asarray(self.fp) + np.asarray(self.usl)

    @property
    def both_empty(self) -> Number:
        return (np.asarray(self.n_pred) == 0) & (np.asarray(self.n_gt) == 0)

    @property
    def _no_fn(self) -> np.ndarray:
        return np.asarray(self.fn) == 0

    def f1(self) -> Number:
        """2TP / (2TP + FP + USL + FN); 1 when both masks are empty (the only 0/0 case)."""
        num = 2 * np.asarray(self.tp)
        den = num + self.fp + self.usl + self.fn
        return safe_ratio(num, den, 1.0)

    def recall(self, zero_division: str = DEFAULT_ZERO_DIVISION) -> Number:
        """TP / (TP + FN). 0/0 (no GT lesion, or every GT lesion touched only by USLs): 1 under
        ``paper``; under ``strict`` 1 only when both masks are empty, else 0."""
        if check_zero_division(zero_division) == "paper":
            undefined: Number = 1.0
        else:
            undefined = _score_if_undefined(self.both_empty)
        return safe_ratio(self.tp, np.asarray(self.tp) + self.fn, undefined)

    def precision(self) -> Number:
        """TP / (TP + FP + USL); without predicted lesion 1 if FN = 0 (GT empty too), else 0."""
        return safe_ratio(self.tp, self.n_pred, _as_number(np.where(self._no_fn, 1.0, 0.0)))

    def usl_rate(self) -> Number:
        """USL / predicted lesions; without predicted lesion 0 if FN = 0 (GT empty too), else 1."""
        return safe_ratio(self.usl, self.n_pred, _as_number(np.where(self._no_fn, 0.0, 1.0)))


@dataclass(frozen=True)
class VoxelCounts:
    """Voxel confusion counts of one image, or summed over images (fields may be arrays)."""

    tp: Number
    fp: Number
    fn: Number
    n_voxels: Number

    @property
    def gt_voxels(self) -> Number:
        return np.asarray(self.tp) + np.asarray(self.fn)

    @property
    def pred_voxels(self) -> Number:
        return np.asarray(self.tp) + np.asarray(self.fp)

    @property
    def both_empty(self) -> Number:
        return (np.asarray(self.gt_voxels) == 0) & (np.asarray(self.pred_voxels) == 0)

    def dice(self) -> Number:
        """2|A∩B| / (|A| + |B|); 1 when both masks are empty."""
        num = 2 * np.asarray(self.tp)
        return safe_ratio(num, num + self.fp + self.fn, _score_if_undefined(self.both_empty))

    def ndsc_k(self, r: float = DEFAULT_NDSC_R) -> Number:
        """FP weight k = (1−r)|GT| / (r (N − |GT|)) of the normalised Dice; 1 when GT is empty."""
        gt = np.asarray(self.gt_voxels, dtype=float)
        background = np.asarray(self.n_voxels, dtype=float) - gt
        k = safe_ratio((1.0 - r) * gt, r * background, 1.0)  # N == |GT| leaves no FP to weigh: k moot
        return _as_number(np.where(gt > 0, k, 1.0))

    def ndsc(self, r: float = DEFAULT_NDSC_R) -> Number:
        """Normalised Dice 2TP / (k·FP + 2TP + FN) (Raina et al.); 1 when both masks are empty.

        Rescaling FP by k makes the score what Dice would be if GT filled a fraction r of the
        image, which removes Dice's dependence on lesion load.
        """
        num = 2 * np.asarray(self.tp, dtype=float)
        den = self.ndsc_k(r) * np.asarray(self.fp, dtype=float) + num + self.fn
        return safe_ratio(num, den, _score_if_undefined(self.both_empty))

    def tpr(self) -> Number:
        """TP / |GT| (voxel sensitivity); without GT: 1 if the prediction is empty too, else 0."""
        return safe_ratio(self.tp, self.gt_voxels, _score_if_undefined(self.both_empty))

    def fpr(self) -> Number:
        """FP / (N − |GT|); 0 when the GT covers the whole image."""
        return safe_ratio(self.fp, np.asarray(self.n_voxels) - self.gt_voxels, 0.0)

    def fdr(self) -> Number:
        """FP / |prediction|; 0 for an empty prediction (nothing was falsely claimed)."""
        return safe_ratio(self.fp, self.pred_voxels, 0.0)


# ------------------------------------------------------------------------------------------------
# Lesion matching
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredLesionVerdict:
    """Verdict on one predicted lesion."""

    verdict: str  # TP | FP | USL
    score: float  # the criterion's score (IoU_adj, best IoU, or overlap fraction for non_zero)
    iou_adj: float
    voxels: int
    gt_ids: tuple[int, ...]  # GT lesions it overlaps


@dataclass(frozen=True)
class GtLesionVerdict:
    """Verdict on one GT lesion."""

    verdict: str  # detected | FN
    voxels: int
    best_iou: float  # best plain IoU with a single predicted lesion
    matched_by_tp: bool  # overlapped by at least one TP prediction
    pred_ids: tuple[int, ...]  # predicted lesions overlapping it


@dataclass(frozen=True)
class LesionMatch:
    """Per-lesion verdicts of one prediction against one GT (index i ↔ lesion id i+1)."""

    criterion: str
    threshold: float
    pred_voxels: np.ndarray  # int64 (n_pred,)
    pred_overlap: np.ndarray  # int64 (n_pred,): |P ∩ GT|
    pred_iou_adj: np.ndarray  # float (n_pred,)
    pred_best_iou: np.ndarray  # float (n_pred,)
    pred_score: np.ndarray  # float (n_pred,): the score the criterion thresholds
    pred_verdict: np.ndarray  # str (n_pred,): TP | FP | USL
    gt_voxels: np.ndarray  # int64 (n_gt,)
    gt_covered: np.ndarray  # int64 (n_gt,): GT voxels covered by any prediction
    gt_best_iou: np.ndarray  # float (n_gt,)
    gt_matched_by_tp: np.ndarray  # bool (n_gt,)
    gt_verdict: np.ndarray  # str (n_gt,): detected | FN
    pairs: OverlapPairs  # a = predicted id, b = GT id

    @property
    def n_pred(self) -> int:
        return int(self.pred_voxels.size)

    @property
    def n_gt(self) -> int:
        return int(self.gt_voxels.size)

    @property
    def counts(self) -> LesionCounts:
        return LesionCounts(
            tp=int(np.sum(self.pred_verdict == TP)),
            fp=int(np.sum(self.pred_verdict == FP)),
            usl=int(np.sum(self.pred_verdict == USL)),
            fn=int(np.sum(self.gt_verdict == FN)),
            n_gt=self.n_gt,
        )

    def _partners(self, of_pred: bool) -> dict[int, tuple[int, ...]]:
        own, other = (
            (self.pairs.a_id, self.pairs.b_id) if of_pred else (self.pairs.b_id, self.pairs.a_id)
        )
        found: dict[int, list[int]] = {}
        for o, p in zip(own.tolist(), other.tolist(), strict=True):
            found.setdefault(o, []).append(p)
        return {k: tuple(sorted(v)) for k, v in found.items()}

    def pred_verdicts(self) -> dict[int, PredLesionVerdict]:
        """Predicted lesion id → verdict, score, IoU_adj, volume and overlapped GT ids."""
        partners = self._partners(of_pred=True)
        return {
            i + 1: PredLesionVerdict(
                verdict=str(self.pred_verdict[i]),
                score=float(self.pred_score[i]),
                iou_adj=float(self.pred_iou_adj[i]),
                voxels=int(self.pred_voxels[i]),
                gt_ids=partners.get(i + 1, ()),
            )
            for i in range(self.n_pred)
        }

    def gt_verdicts(self) -> dict[int, GtLesionVerdict]:
        """GT lesion id → detected/FN, volume, best IoU and overlapping predicted ids."""
        partners = self._partners(of_pred=False)
        return {
            i + 1: GtLesionVerdict(
                verdict=str(self.gt_verdict[i]),
                voxels=int(self.gt_voxels[i]),
                best_iou=float(self.gt_best_iou[i]),
                matched_by_tp=bool(self.gt_matched_by_tp[i]),
                pred_ids=partners.get(i + 1, ()),
            )
            for i in range(self.n_gt)
        }


def adjusted_iou(
    pairs: OverlapPairs, pred_voxels: np.ndarray, gt_voxels: np.ndarray
) -> np.ndarray:
    """IoU_adj of every predicted lesion from the pair counts alone.

    For P with overlapped GT lesions G(P), K = ∪G(P) and K' = K minus the voxels of other
    predictions: |P ∩ K'| = Σ_g |P∩g| (P is disjoint from other predictions), and, since GT
    lesions are disjoint, |K'| = Σ_g (|g| − covered(g)) + |P ∩ K|, where covered(g) counts g's
    voxels under any prediction. Hence |P ∪ K'| = |P| + |K'| − |P ∩ K'| = |P| + Σ_g uncovered(g).
    IoU_adj is 0 without overlap.
    """
    n_pred, n_gt = pred_voxels.size, gt_voxels.size
    covered = np.bincount(pairs.b_id, weights=pairs.voxels, minlength=n_gt + 1)[1:]
    uncovered = gt_voxels - covered
    intersection = np.bincount(pairs.a_id, weights=pairs.voxels, minlength=n_pred + 1)[1:]
    uncovered_touched = np.bincount(
        pairs.a_id, weights=uncovered[pairs.b_id - 1], minlength=n_pred + 1
    )[1:]
    return safe_ratio(intersection, pred_voxels + uncovered_touched, 0.0)


def match_lesions(
    pred_labels: np.ndarray,
    n_pred: int,
    gt_labels: np.ndarray,
    n_gt: int,
    *,
    criterion: str = DEFAULT_CRITERION,
    threshold: float = DEFAULT_THRESHOLD,
) -> LesionMatch:
    """Verdicts for labelled prediction and GT (outputs of `label_components`).

    criterion ``iou_adj`` thresholds IoU_adj, ``iou`` thresholds the best IoU with a single GT
    lesion (both: TP if score ≥ threshold, USL if it overlaps GT but scores below, FP if it
    overlaps none); ``non_zero`` makes every overlapping prediction a TP (threshold unused, never
    USL; its score is the fraction of P lying on GT). A GT lesion is FN only when no predicted
    voxel overlaps it.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    pairs = overlap_pairs(pred_labels, gt_labels)
    pred_voxels = label_sizes(pred_labels, n_pred)
    gt_voxels = label_sizes(gt_labels, n_gt)
    pred_overlap = np.bincount(pairs.a_id, weights=pairs.voxels, minlength=n_pred + 1)[1:]
    pred_overlap = pred_overlap.astype(np.int64)
    gt_covered = np.bincount(pairs.b_id, weights=pairs.voxels, minlength=n_gt + 1)[1:]
    gt_covered = gt_covered.astype(np.int64)

    iou_adj = adjusted_iou(pairs, pred_voxels, gt_voxels)
    pred_best_iou, gt_best_iou = best_iou(pairs, pred_voxels, gt_voxels)
    touches_gt = pred_overlap > 0
    if criterion == "iou_adj":
        score = iou_adj
        is_tp = touches_gt & (score >= threshold)
    elif criterion == "iou":
        score = pred_best_iou
        is_tp = touches_gt & (score >= threshold)
    else:  # non_zero
        score = safe_ratio(pred_overlap, pred_voxels, 0.0)
        is_tp = touches_gt
    pred_verdict = np.where(is_tp, TP, np.where(touches_gt, USL, FP)).astype("<U3")

    gt_matched_by_tp = np.zeros(n_gt, dtype=bool)
    if len(pairs):
        gt_matched_by_tp[pairs.b_id[is_tp[pairs.a_id - 1]] - 1] = True
    gt_verdict = np.where(gt_covered > 0, DETECTED, FN).astype("<U8")
    return LesionMatch(
        criterion=criterion,
        threshold=float(threshold),
        pred_voxels=pred_voxels,
        pred_overlap=pred_overlap,
        pred_iou_adj=iou_adj,
        pred_best_iou=pred_best_iou,
        pred_score=np.asarray(score, dtype=float),
        pred_verdict=pred_verdict,
        gt_voxels=gt_voxels,
        gt_covered=gt_covered,
        gt_best_iou=gt_best_iou,
        gt_matched_by_tp=gt_matched_by_tp,
        gt_verdict=gt_verdict,
        pairs=pairs,
    )


def lesionwise_metrics(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    *,
    connectivity: int = DEFAULT_CONNECTIVITY,
    criterion: str = DEFAULT_CRITERION,
    threshold: float = DEFAULT_THRESHOLD,
) -> LesionMatch:
    """Label both binary masks (non-zero = lesion) and match their lesions (`match_lesions`)."""
    _check_same_shape(pred_mask, gt_mask)
    pred_labels, n_pred = label_components(pred_mask, connectivity)
    gt_labels, n_gt = label_components(gt_mask, connectivity)
    return match_lesions(
        pred_labels, n_pred, gt_labels, n_gt, criterion=criterion, threshold=threshold
    )


def voxel_counts(pred_mask: np.ndarray, gt_mask: np.ndarray) -> VoxelCounts:
    """Voxel TP/FP/FN and image size of two same-shape binary masks (non-zero = lesion)."""
    _check_same_shape(pred_mask, gt_mask)
    pred = np.asarray(pred_mask) > 0
    gt = np.asarray(gt_mask) > 0
    tp = int(np.count_nonzero(pred & gt))
    return VoxelCounts(
        tp=tp,
        fp=int(np.count_nonzero(pred)) - tp,
        fn=int(np.count_nonzero(gt)) - tp,
        n_voxels=int(pred.size),
    )


def scores(
    lesions: LesionCounts,
    voxels: VoxelCounts,
    *,
    r: float = DEFAULT_NDSC_R,
    zero_division: str = DEFAULT_ZERO_DIVISION,
) -> dict[str, Number]:
    """Every score of the counts by name: floats for one image's (or one pooled set of) counts,
    arrays for arrays of counts (bootstrap resamples)."""
    return {
        "f1": lesions.f1(),
        "recall": lesions.recall(zero_division),
        "precision": lesions.precision(),
        "usl_rate": lesions.usl_rate(),
        "dice": voxels.dice(),
        "ndsc": voxels.ndsc(r),
        "voxel_tpr": voxels.tpr(),
        "voxel_fpr": voxels.fpr(),
        "voxel_fdr": voxels.fdr(),
    }


def evaluate_masks(
    pred_mask: np.ndarray,
    gt_mask: np.ndarray,
    *,
    connectivity: int = DEFAULT_CONNECTIVITY,
    criterion: str = DEFAULT_CRITERION,
    threshold: float = DEFAULT_THRESHOLD,
    r: float = DEFAULT_NDSC_R,
    zero_division: str = DEFAULT_ZERO_DIVISION,
) -> dict[str, float]:
    """Counts and scores of one prediction against one GT: n_pred, n_gt, tp, fp, usl, fn, f1..."""
    match = lesionwise_metrics(
        pred_mask, gt_mask, connectivity=connectivity, criterion=criterion, threshold=threshold
    )
    counts = match.counts
    out: dict[str, float] = {
        "n_pred": match.n_pred,
        "n_gt": match.n_gt,
        "tp": counts.tp,
        "fp": counts.fp,
        "usl": counts.usl,
        "fn": counts.fn,
    }
    out.update(scores(counts, voxel_counts(pred_mask, gt_mask), r=r, zero_division=zero_division))
    return out


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"masks differ in shape: {np.shape(a)} vs {np.shape(b)}")
