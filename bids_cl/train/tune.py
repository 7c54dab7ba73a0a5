"""Choose a model's probability threshold on its validation split and store it in the model.

nnU-Net's argmax (threshold 0.5) is not the lesion-wise optimum for small, sparse lesions: a network
trained briefly or on few lesions is often over- or under-confident. The paper's predecessor pipeline tuned
the threshold by cross-validation to maximise lesion-wise F1 (adjusted IoU); this step does the same with
the data nnU-Net held out while training: every validation case of a fold is segmented with that fold's
checkpoint only, the probabilities are thresholded on a grid, and the threshold with the best pooled
lesion-wise F1 is written to ``bids_cl_model.json`` (``postprocessing``). ``bids_cl`` then uses it unless
``--threshold`` is given. The lock file is rewritten, since the model JSON is one of the locked files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_cl.evaluation.metrics import LesionCounts, label_lesions, match_lesions

# The predecessor searched 0.30-0.65; confident false positives (docs/demo-model.md) call for higher values.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 ... 0.95
NNUNET_THRESHOLD = 0.5


def pooled_counts_by_threshold(cases: Iterable[tuple[np.ndarray, np.ndarray]], thresholds: Sequence[float],
                               *, connectivity: int = 26) -> dict[float, LesionCounts]:
    """Lesion counts summed over cases for each threshold; a case is (probability, truth mask)."""
    totals = {float(t): LesionCounts(tp=0, fp=0, usl=0, fn=0, n_gt=0) for t in thresholds}
    for probability, truth in cases:
        gt_labels, n_gt = label_lesions(truth > 0, connectivity)  # once per case, not per threshold
        for t in totals:
            c = match_lesions(*label_lesions(probability > t, connectivity), gt_labels, n_gt).counts
            s = totals[t]
            totals[t] = LesionCounts(tp=s.tp + c.tp, fp=s.fp + c.fp, usl=s.usl + c.usl, fn=s.fn + c.fn,
                                     n_gt=s.n_gt + c.n_gt)
    return totals


def choose_threshold(f1_by_threshold: dict[float, float], *, default: float = NNUNET_THRESHOLD) -> float:
    """The threshold with the highest F1; among equals, the one closest to ``default``.

    Ties are common on a small validation split (several thresholds give the same lesion counts); moving
    away from nnU-Net's 0.5 without evidence would only add noise.
    """
    if not f1_by_threshold:
        raise ValueError("no thresholds to choose from")
    best = max(f1_by_threshold.values())
    candidates = [t for t, f1 in f1_by_threshold.items() if np.isclose(f1, best)]
    return min(candidates, key=lambda t: (abs(t - default), t))


def validation_cases(preprocessed_dir: Path) -> dict[int, list[str]]:
    """Validation case ids per fold, from nnU-Net's ``splits_final.json``."""
    splits = json.loads((preprocessed_dir / "splits_final.json").read_text())
    return {fold: list(split["val"]) for fold, split in enumerate(splits)}


def tune_threshold(model_dir: Path, raw_dir: Path, preprocessed_dir: Path, *, folds: Sequence[int],
                   device: str = "auto", nthreads: int | None = None,
                   thresholds: Sequence[float] = THRESHOLD_GRID, log: Any = print) -> dict[str, Any] | None:
    """Segment each fold's validation cases with that fold, pick the threshold, store it in the model.

    Images come from the raw dataset (already skull stripped by the convert step), the truth from
    nnU-Net's ``gt_segmentations`` (its copy of the labels). Returns the ``postprocessing`` record, or
    ``None`` when there is no validation case (``--val-fraction 0``).
    """
    import nibabel as nib

    from bids_cl.engine import CLSegmenter
    from bids_cl.engine.lockfile import read_lock_file, write_lock_file
    from bids_cl.engine.models import MODEL_JSON

    by_fold = {f: cases for f, cases in validation_cases(preprocessed_dir).items() if f in folds and cases}
    if not by_fold:
        log("tune: no validation cases; the model keeps nnU-Net's threshold 0.5")
        return None

    def validation_probabilities() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        # One case at a time: the counts are accumulated as the cases come, never all maps at once.
        for fold, cases in by_fold.items():
            segmenter = CLSegmenter(model_dir, folds=[fold], device=device, tta=False, nthreads=nthreads,
                                    threshold=NNUNET_THRESHOLD)
            for case in cases:
                result = segmenter.segment(raw_dir / "imagesTr" / f"{case}_0000.nii.gz")
                truth = nib.load(str(preprocessed_dir / "gt_segmentations" / f"{case}.nii.gz"))
                yield np.asarray(result.probability.dataobj, dtype=np.float32), np.asarray(truth.dataobj)
            log(f"tune: fold {fold}: {len(cases)} validation case(s) segmented")

    grid = sorted({float(t) for t in thresholds} | {NNUNET_THRESHOLD})
    counts = pooled_counts_by_threshold(validation_probabilities(), grid)
    f1 = {t: float(c.f1()) for t, c in counts.items()}
    best = choose_threshold(f1)
    at_default = counts[NNUNET_THRESHOLD]
    record = {
        "threshold": best,
        "selected_by": "pooled lesion-wise F1 (adjusted IoU >= 0.25, 26-connected) on the validation split, "
                       "each fold's cases segmented by that fold without test-time mirroring",
        "validation_cases": sum(len(cases) for cases in by_fold.values()),
        "validation_lesions": int(at_default.n_gt),
        "f1_at_0.5": round(float(at_default.f1()), 4),
        "f1": round(f1[best], 4),
        "f1_by_threshold": {f"{t:.2f}": round(v, 4) for t, v in f1.items()},
    }
    meta_file = model_dir / MODEL_JSON
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta["postprocessing"] = record
    source = (read_lock_file(model_dir) or {}).get("source") or None
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    write_lock_file(model_dir, source=source)
    log(f"tune: threshold {best:.2f} (validation F1 {record['f1']:.3f}; at 0.5: {record['f1_at_0.5']:.3f}, "
        f"{record['validation_cases']} cases, {record['validation_lesions']} lesions)")
    return record
