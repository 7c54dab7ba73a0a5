"""Measured quality of a CL model on held-out phantoms (the table in docs/demo-model.md).

For every evaluation set (phantom datasets whose seeds were never used for training) each annotated image is
skull stripped, segmented with the model and scored against the phantom's truth with bids_cl's lesion-wise
metrics (paper definitions: 26-connected lesions, adjusted IoU >= 0.25 for a true positive):

    python benchmarks/demo_quality.py --data-root /tmp/demo_eval/tiny --size tiny \
        --generate --skull-strip auto --out docs-table.md

``--generate`` (re)creates missing evaluation sets with bids_cl.synth (the seeds below) at ``--size``
(``tiny``, 2 mm, the demo model's domain; ``full``, 1 / 0.75 mm). Keep one ``--data-root`` per size.
The model runs through ``bids_cl.engine.CLSegmenter``, the path the app uses. It applies the model's tuned
threshold (bids_cl-train's tune step) unless ``--threshold`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

# Held-out sets: seeds never used for the demo model's training data (1001-1003; bids_cl/train/demo.py).
EVAL_SETS: dict[str, dict[str, Any]] = {
    "eval_in": dict(participants=10, seed=2001, field="mixed", sequence="mixed"),
    "eval_orient": dict(participants=6, seed=2002, field="3T", sequence="mixed", orientation="mixed"),
    "eval_uni": dict(participants=6, seed=2003, field="7T", sequence="mp2rage", uni_as_t1w=True,
                     orientation="LPS"),
    # anisotropic: the size's voxel edge, 1.2 x along the last axis
    "eval_voxel": dict(participants=6, seed=2004, field="3T", sequence="mprage", orientation="oblique"),
}
VOXEL_EDGE_MM = {"tiny": 2.0, "full": 1.0}
DESCRIPTIONS = {
    "eval_in": "in-domain: 3T+7T, MP2RAGE+MPRAGE, RAS",
    "eval_orient": "shifted: RAS/LPS/LAS/oblique storage orientation (3T)",
    "eval_uni": "shifted: 7T UNI stored as acq-UNI_T1w, LPS",
    "eval_voxel": "shifted: anisotropic voxels (1.2x along z), MPRAGE, oblique",
}


def set_options(name: str, size: str) -> dict[str, Any]:
    """generate_dataset keywords of an evaluation set at one phantom size."""
    options = dict(EVAL_SETS[name], size=size)
    if name == "eval_voxel":
        edge = VOXEL_EDGE_MM[size]
        options["voxel_size"] = (edge, edge, 1.2 * edge)
    return options


@dataclass
class Segmenter:
    """Brain image (nibabel, any orientation) -> binary CL mask on the same grid, through the app's engine."""

    model: str
    nthreads: int
    tta: bool
    threshold: float | None = None  # None: the model's tuned threshold where it has one, else 0.5
    min_lesion_size: str | None = None  # None: the model's tuned minimum size where it has one

    def __post_init__(self) -> None:
        from bids_cl.engine.segmentation import CLSegmenter

        # Configured once, used for every image; the model is found and lock-checked as bids_cl --model does.
        self._engine = CLSegmenter(self.model, device="cpu", tta=self.tta, nthreads=self.nthreads,
                                   threshold=self.threshold, min_lesion_size=self.min_lesion_size)

    path = "bids_cl.engine.CLSegmenter"

    @property
    def threshold_used(self) -> str:
        return f"{self._engine.threshold:g} ({self._engine.threshold_source})"

    @property
    def min_lesion_size_used(self) -> str:
        return f"{self._engine.min_lesion_size or 'none'} ({self._engine.min_lesion_size_source})"

    def __call__(self, brain: nib.Nifti1Image) -> np.ndarray:
        return np.asanyarray(self._engine.segment(brain).mask.dataobj) > 0


def skull_strip(case: Any, img: nib.Nifti1Image, strategy: str) -> nib.Nifti1Image:
    if strategy == "truth-mask":
        mask = np.asanyarray(nib.load(str(case.brain_mask)).dataobj) > 0
    else:
        from bids_cl.preproc import skull_strip as strip

        inv2 = nib.load(str(case.inv2)) if case.inv2 is not None else None
        res = strip(img, strategy=strategy, inv2_img=inv2, nthreads=1, is_mp2rage=case.sequence == "MP2RAGE")
        mask = np.asanyarray(res.mask.dataobj) > 0
    data = np.where(mask, img.get_fdata(dtype=np.float32), 0).astype(np.float32)
    return nib.Nifti1Image(data, img.affine)


def wml_called_cl(pred: np.ndarray, wml: np.ndarray) -> tuple[int, int]:
    """(WML distractors touched by the CL prediction, WML distractors) - 26-connected lesions."""
    labels, n = ndimage.label(wml > 0, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return 0, 0
    hit = np.unique(labels[(labels > 0) & pred])
    return int(hit.size), int(n)


def lesion_rows(name: str, case_id: str, pred: np.ndarray, gt: np.ndarray) -> list[dict[str, Any]]:
    """One row per predicted lesion (TP/FP/USL) and per missed truth lesion (FN), with its size: what a
    minimum lesion size would keep or remove."""
    from bids_cl.evaluation.metrics import FN, lesionwise_metrics

    match = lesionwise_metrics(pred, gt)
    rows = [{"set": name, "case": case_id, "lesion": "predicted", "verdict": str(v), "voxels": int(n)}
            for v, n in zip(match.pred_verdict, match.pred_voxels, strict=True)]
    rows += [{"set": name, "case": case_id, "lesion": "truth", "verdict": FN, "voxels": int(n)}
             for v, n in zip(match.gt_verdict, match.gt_voxels, strict=True) if v == FN]
    return rows


def evaluate_set(name: str, root: Path, segmenter: Segmenter, strategy: str,
                 lesions: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    from bids_cl.evaluation.metrics import evaluate_masks
    from bids_cl.train.convert import find_cases

    rows = []
    cases, _ = find_cases(root, root / "derivatives" / "manual_masks")
    for case in cases:
        img = nib.load(str(case.image))
        brain = skull_strip(case, img, strategy)
        t0 = time.monotonic()
        pred = segmenter(brain)
        seconds = time.monotonic() - t0
        gt = np.asanyarray(nib.load(str(case.label)).dataobj) > 0
        wml_path = Path(str(case.label).replace("_label-CL_mask", "_label-WML_mask"))
        wml = np.asanyarray(nib.load(str(wml_path)).dataobj) > 0 if wml_path.is_file() else np.zeros_like(gt)
        hit, n_wml = wml_called_cl(pred, wml)
        row = {"set": name, "case": case.case_id, "sequence": case.sequence,
               "orientation": "".join(nib.aff2axcodes(img.affine)), "zooms": list(img.header.get_zooms()[:3]),
               "seconds": round(seconds, 1), "wml_hit": hit, "wml": n_wml}
        row.update(evaluate_masks(pred, gt))
        rows.append(row)
        if lesions is not None:
            lesions += lesion_rows(name, case.case_id, pred, gt)
        print(f"{name} {case.case_id}: F1 {row['f1']:.2f} TP {row['tp']} FP {row['fp']} USL {row['usl']} "
              f"FN {row['fn']} Dice {row['dice']:.2f} WML->CL {hit}/{n_wml} ({seconds:.0f} s)", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tp, fp, usl, fn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "usl", "fn"))
    wml_hit, wml = sum(r["wml_hit"] for r in rows), sum(r["wml"] for r in rows)
    pooled_f1 = 2 * tp / (2 * tp + fp + usl + fn) if (2 * tp + fp + usl + fn) else 1.0
    return {
        "images": len(rows), "gt_cl": sum(int(r["n_gt"]) for r in rows), "tp": tp, "fp": fp, "usl": usl,
        "fn": fn, "f1_pooled": pooled_f1,
        "recall_pooled": tp / (tp + fn) if tp + fn else 1.0,
        "precision_pooled": tp / (tp + fp + usl) if tp + fp + usl else 1.0,
        "f1_mean": float(np.mean([r["f1"] for r in rows])),
        "dice_mean": float(np.mean([r["dice"] for r in rows if r["n_gt"] > 0] or [np.nan])),
        "wml_called_cl": wml_hit / wml if wml else 0.0, "wml": wml,
        "seconds_mean": float(np.mean([r["seconds"] for r in rows])),
    }


def markdown(summaries: dict[str, dict[str, Any]]) -> str:
    head = ("| set | images | GT CLs | TP | FP | USL | FN | F1 (pooled) | recall | precision "
            "| F1 (mean/image) | Dice (mean) | WML called CL | s/image |\n|" + "---|" * 14)
    lines = [head]
    for name, s in summaries.items():
        lines.append(
            f"| {name} ({DESCRIPTIONS.get(name, '')}) | {s['images']} | {s['gt_cl']} | {s['tp']} | {s['fp']} "
            f"| {s['usl']} | {s['fn']} | {s['f1_pooled']:.3f} | {s['recall_pooled']:.3f} "
            f"| {s['precision_pooled']:.3f} | {s['f1_mean']:.3f} | {s['dice_mean']:.3f} "
            f"| {s['wml_called_cl']:.3f} ({s['wml']}) | {s['seconds_mean']:.0f} |")
    return "\n".join(lines) + "\n"


def generate(root: Path, names: list[str], size: str) -> None:
    from bids_cl.synth.generate import generate_dataset

    for name in names:
        if not (root / name / "derivatives" / "manual_masks").is_dir():
            print(f"generating {name} ({size}) ...", flush=True)
            generate_dataset(root / name, overwrite=True, **set_options(name, size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="a model name or folder, as for bids_cl --model")
    p.add_argument("--data-root", type=Path, required=True, help="folder holding the evaluation sets")
    p.add_argument("--sets", nargs="+", default=list(EVAL_SETS))
    p.add_argument("--generate", action="store_true", help="generate missing evaluation sets")
    p.add_argument("--size", choices=tuple(VOXEL_EDGE_MM), default="tiny",
                   help="phantom size of generated sets (tiny: 2 mm, the demo model's domain)")
    p.add_argument("--skull-strip", default="truth-mask",
                   help="truth-mask (phantom brain mask) or a bids_cl.preproc strategy, e.g. auto")
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    p.add_argument("--threshold", type=float,
                   help="probability threshold (default: the model's tuned one, else 0.5)")
    p.add_argument("--min-lesion-size", metavar="SIZE",
                   help="minimum lesion size, as bids_cl --min-lesion-size (default: the model's tuned one, "
                   "else none; 0 keeps every lesion)")
    p.add_argument("--nthreads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the markdown table here (and <out>.json with rows)")
    p.add_argument("--lesions", type=Path, metavar="TSV",
                   help="also write one row per predicted lesion and per missed truth lesion (verdict, "
                   "voxels); with --min-lesion-size 0 it shows which sizes a size filter would remove")
    args = p.parse_args(argv)

    if args.generate:
        generate(args.data_root, args.sets, args.size)
    segmenter = Segmenter(args.model, args.nthreads, args.tta, args.threshold, args.min_lesion_size)
    print(f"model {args.model} via {segmenter.path}, skull strip {args.skull_strip}, threshold "
          f"{segmenter.threshold_used}, minimum lesion size {segmenter.min_lesion_size_used}", flush=True)
    all_rows, summaries = [], {}
    lesions: list[dict[str, Any]] | None = [] if args.lesions else None
    for name in args.sets:
        rows = evaluate_set(name, args.data_root / name, segmenter, args.skull_strip, lesions)
        all_rows += rows
        summaries[name] = summarise(rows)
    table = markdown(summaries)
    print(table)
    if args.lesions:
        import pandas as pd

        args.lesions.write_text(pd.DataFrame(lesions, columns=["set", "case", "lesion", "verdict", "voxels"])
                                .to_csv(sep="\t", index=False))
    if args.out:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"model": args.model, "size": args.size, "path": segmenter.path, "skull_strip": args.skull_strip,
             "tta": args.tta, "threshold": segmenter.threshold_used,
             "min_lesion_size": segmenter.min_lesion_size_used, "summaries": summaries,
             "rows": all_rows}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
