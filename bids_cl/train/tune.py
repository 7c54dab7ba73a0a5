"""Choose a model's post-processing on its validation split and store it in the model.

nnU-Net's argmax (threshold 0.5) keeping every connected component is not the lesion-wise optimum for
small, sparse lesions: a network trained briefly or on few lesions is over- or under-confident, and its
false positives are mostly specks of a few voxels (docs/demo-model.md). The paper's predecessor pipeline
tuned the threshold by cross-validation to maximise lesion-wise F1 (adjusted IoU) and dropped the smallest
components; this step tunes both with the data nnU-Net held out while training. Every validation case of a
fold is segmented with that fold's checkpoint only; each (threshold, minimum lesion size) pair of a grid is
scored with the pooled lesion-wise F1, and the best pair is written to ``bids_cl_model.json``
(``postprocessing``). ``bids_cl`` then uses it unless ``--threshold`` / ``--min-lesion-size`` are given. The
lock file is rewritten, since the model JSON is one of the locked files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bids_cl.engine.postproc import min_size_in_voxels, remove_small_components
from bids_cl.evaluation.metrics import LesionCounts, match_lesions
from bids_cl.utils.components import label_components

# The predecessor searched 0.30-0.65; confident false positives (docs/demo-model.md) call for higher values.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 ... 0.95
# Minimum lesion sizes, in voxels of the validation images (converted to µL, so the model's value means the
# same volume on any grid). 0 keeps every component, as nnU-Net does.
MIN_SIZE_GRID_VOXELS: tuple[int, ...] = (0, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20)
NNUNET_THRESHOLD = 0.5

Setting = tuple[float, float]  # (probability threshold, minimum lesion size in µL)


def pooled_counts(cases: Iterable[tuple[np.ndarray, np.ndarray, float]], thresholds: Sequence[float],
                  min_sizes_ul: Sequence[float] = (0.0,), *, connectivity: int = 26
                  ) -> dict[Setting, LesionCounts]:
    """Lesion counts summed over cases for each (threshold, minimum size in µL).

    A case is (probability, truth mask, voxel volume in µL). Sizes become voxel counts per case exactly as
    the engine converts ``--min-lesion-size 80uL`` (``min_size_in_voxels``), so tuning scores what
    inference will do.
    """
    thresholds, sizes = sorted({float(t) for t in thresholds}), sorted({float(s) for s in min_sizes_ul})
    totals = {(t, s): LesionCounts(tp=0, fp=0, usl=0, fn=0, n_gt=0) for t in thresholds for s in sizes}
    for probability, truth, voxel_ul in cases:
        gt_labels, n_gt = label_components(truth > 0, connectivity)  # once per case, not per setting
        for t in thresholds:
            labels, n = label_components(probability > t, connectivity)
            by_voxels: dict[int, LesionCounts] = {}  # sizes that round to the same voxel count score once
            for s in sizes:
                min_voxels = min_size_in_voxels((s, "ul"), voxel_ul) or 0
                if min_voxels not in by_voxels:
                    kept, n_kept = remove_small_components(labels, n, min_voxels)
                    by_voxels[min_voxels] = match_lesions(kept, n_kept, gt_labels, n_gt).counts
                totals[(t, s)] += by_voxels[min_voxels]
    return totals


def choose_setting(f1_by_setting: dict[Setting, float], *, default: float = NNUNET_THRESHOLD) -> Setting:
    """The (threshold, minimum size) with the highest F1; among equals, the threshold closest to
    ``default`` (then the lower one), then the smallest minimum size.

    Ties are common on a small validation split (several settings give the same lesion counts); moving
    away from nnU-Net's argmax, or removing more than needed, without evidence would only add noise.
    """
    if not f1_by_setting:
        raise ValueError("no settings to choose from")
    best = max(f1_by_setting.values())
    candidates = [k for k, f1 in f1_by_setting.items() if np.isclose(f1, best)]
    return min(candidates, key=lambda k: (abs(k[0] - default), k[0], k[1]))


def validation_cases(preprocessed_dir: Path) -> dict[int, list[str]]:
    """Validation case ids per fold, from nnU-Net's ``splits_final.json``."""
    splits = json.loads((preprocessed_dir / "splits_final.json").read_text())
    return {fold: list(split["val"]) for fold, split in enumerate(splits)}


def tune_postprocessing(model_dir: Path, raw_dir: Path, preprocessed_dir: Path, *, folds: Sequence[int],
                        device: str = "auto", nthreads: int | None = None,
                        thresholds: Sequence[float] = THRESHOLD_GRID,
                        min_sizes_voxels: Sequence[int] = MIN_SIZE_GRID_VOXELS,
                        log: Any = print) -> dict[str, Any] | None:
    """Segment each fold's validation cases with that fold, pick threshold and minimum lesion size, store
    them in the model.

    Images come from the raw dataset (already skull stripped by the convert step), the truth from
    nnU-Net's ``gt_segmentations`` (its copy of the labels). Minimum sizes are given in voxels of the
    validation images and stored in µL (their median voxel volume). Returns the ``postprocessing`` record,
    or ``None`` when there is no validation case (``--val-fraction 0``).
    """
    import nibabel as nib

    from bids_cl.engine import CLSegmenter
    from bids_cl.engine.lesions import voxel_volume_ul
    from bids_cl.engine.lockfile import read_lock_file, write_lock_file
    from bids_cl.engine.models import MODEL_JSON

    by_fold = {f: cases for f, cases in validation_cases(preprocessed_dir).items() if f in folds and cases}
    if not by_fold:
        log("tune: no validation cases; the model keeps nnU-Net's threshold 0.5 and every lesion size")
        return None

    def image_of(case: str) -> Path:
        return raw_dir / "imagesTr" / f"{case}_0000.nii.gz"

    # Headers only: the voxel volume that turns the voxel grid into µL. Rounded to 6 digits so that float32
    # headers give 80 µL, not 79.99999999999999, for 10 voxels of 2 mm.
    volumes = [voxel_volume_ul(nib.load(str(image_of(c))).affine) for cs in by_fold.values() for c in cs]
    voxel_ul = float(f"{np.median(volumes):.6g}")
    size_ul = {int(v): float(v) * voxel_ul for v in sorted({int(v) for v in min_sizes_voxels} | {0})}

    def validation_probabilities() -> Iterable[tuple[np.ndarray, np.ndarray, float]]:
        # One case at a time: the counts are accumulated as the cases come, never all maps at once.
        for fold, cases in by_fold.items():
            segmenter = CLSegmenter(model_dir, folds=[fold], device=device, tta=False, nthreads=nthreads,
                                    threshold=NNUNET_THRESHOLD, min_lesion_size=0)
            for case in cases:
                result = segmenter.segment(image_of(case))
                truth = nib.load(str(preprocessed_dir / "gt_segmentations" / f"{case}.nii.gz"))
                yield (np.asarray(result.probability.dataobj, dtype=np.float32), np.asarray(truth.dataobj),
                       voxel_volume_ul(result.probability.affine))
            log(f"tune: fold {fold}: {len(cases)} validation case(s) segmented")

    grid = sorted({float(t) for t in thresholds} | {NNUNET_THRESHOLD})
    counts = pooled_counts(validation_probabilities(), grid, list(size_ul.values()))
    f1 = {k: float(c.f1()) for k, c in counts.items()}
    best_t, best_ul = choose_setting(f1)
    best_voxels = next(v for v, ul in size_ul.items() if ul == best_ul)
    at_default = counts[(NNUNET_THRESHOLD, 0.0)]
    record = {
        "threshold": best_t,
        "min_lesion_size_ul": best_ul,
        "min_lesion_size_voxels": best_voxels,
        "voxel_volume_ul": voxel_ul,
        "selected_by": "pooled lesion-wise F1 (adjusted IoU >= 0.25, 26-connected) on the validation split "
                       "over thresholds x minimum lesion sizes, each fold's cases segmented by that fold "
                       "without test-time mirroring",
        "validation_cases": sum(len(cases) for cases in by_fold.values()),
        "validation_lesions": int(at_default.n_gt),
        "f1_at_0.5": round(float(at_default.f1()), 4),  # nnU-Net's argmax, every component kept
        "f1": round(f1[(best_t, best_ul)], 4),
        # threshold -> {minimum size in voxels of the validation images -> F1}
        "f1_grid": {f"{t:.2f}": {str(v): round(f1[(t, ul)], 4) for v, ul in size_ul.items()} for t in grid},
    }
    meta_file = model_dir / MODEL_JSON
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta["postprocessing"] = record
    source = (read_lock_file(model_dir) or {}).get("source") or None
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    write_lock_file(model_dir, source=source)
    log(f"tune: threshold {best_t:.2f}, minimum lesion size {best_voxels} voxels ({best_ul:g} uL) "
        f"(validation F1 {record['f1']:.3f}; nnU-Net's argmax keeping every lesion: "
        f"{record['f1_at_0.5']:.3f}; {record['validation_cases']} cases, "
        f"{record['validation_lesions']} lesions)")
    return record
