"""bids_cl-evaluate: benchmark bids_cl predictions against reference masks.

    bids_cl-evaluate OUT_DIR --reference REF_DERIVATIVES [--label CL]
        [--criterion iou_adj|iou|non_zero] [--threshold 0.25] [--connectivity 26]
        [--zero-division paper|strict] [--by COLUMN ...] [--bootstrap N] [--seed S]
        [--longitudinal] [-o EVAL_DIR]

Pairs every native-space ``<prefix>_label-CL_mask.nii.gz`` of OUT_DIR with the reference
``<prefix>_label-<label>_mask.nii.gz`` of REF_DERIVATIVES and writes the tables and an HTML summary
into EVAL_DIR (default OUT_DIR/evaluation). docs/evaluation.md describes the outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bids_cl import __version__
from bids_cl.derivatives import spec
from bids_cl.derivatives.reader import collect_changes, output_participants
from bids_cl.errors import (
    EXIT_CANNOT_CREATE_OUTPUT,
    EXIT_MISSING_INPUT,
    EXIT_OK,
    EXIT_USAGE,
    BidsClError,
)
from bids_cl.evaluation.aggregate import (
    DEFAULT_SIZE_BINS_UL,
    by_size,
    by_type,
    summarise,
    summarise_by,
)
from bids_cl.evaluation.evaluate import NA, EvaluationSettings, evaluate_pair
from bids_cl.evaluation.longitudinal import CONVENTIONS as LONGITUDINAL_CONVENTIONS
from bids_cl.evaluation.longitudinal import evaluate_longitudinal, summarise_pairs
from bids_cl.evaluation.longitudinal import tables_of as longitudinal_tables
from bids_cl.evaluation.metrics import (
    CRITERIA,
    DEFAULT_CRITERION,
    DEFAULT_NDSC_R,
    DEFAULT_THRESHOLD,
    DEFAULT_ZERO_DIVISION,
    ZERO_DIVISION_RULES,
    ZERO_DIVISIONS,
)
from bids_cl.evaluation.pairing import (
    find_participants_tsv,
    find_predictions,
    find_references,
    pair_masks,
)
from bids_cl.evaluation.report import aggregate_display, render_html
from bids_cl.utils.cli import UsageParser, run_command
from bids_cl.utils.components import CONNECTIVITIES, DEFAULT_CONNECTIVITY

PROG = "bids_cl-evaluate"
# Image-level columns that --by may name besides the participants.tsv columns.
IMAGE_GROUP_COLUMNS = ("participant_id", "session", "acquisition", "field_strength", "sequence")
LONGITUDINAL_DIR = "longitudinal"
TSV_OPTIONS = {"sep": "\t", "index": False, "na_rep": NA, "float_format": "%.6g"}


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=PROG,
        description="Lesion-wise and voxel-wise evaluation of bids_cl CL masks against references.",
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="bids_cl output folder")
    parser.add_argument("--reference", type=Path, required=True, metavar="REF_DERIVATIVES",
                        help="derivatives folder with reference masks (e.g. derivatives/manual_masks)")
    parser.add_argument("--label", default="CL",
                        help="label of the reference masks <prefix>_label-<label>_mask (default CL)")
    parser.add_argument("--criterion", choices=CRITERIA, default=DEFAULT_CRITERION,
                        help="TP criterion for predicted lesions (default iou_adj)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="score threshold in (0, 1] for iou_adj and iou (default 0.25)")
    parser.add_argument("--connectivity", type=int, choices=CONNECTIVITIES,
                        default=DEFAULT_CONNECTIVITY, help="lesion connectivity (default 26)")
    parser.add_argument("--zero-division", choices=ZERO_DIVISIONS, default=DEFAULT_ZERO_DIVISION,
                        help="values of the undefined (0/0) lesion-wise scores: paper (the "
                             "reference metrics.py, default) or strict (recall 0 without TP "
                             "and FN unless both masks are empty); named in settings.json")
    parser.add_argument("--by", nargs="+", default=[], metavar="COLUMN",
                        help="breakdowns by participants.tsv columns or by "
                             + ", ".join(IMAGE_GROUP_COLUMNS))
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the confidence intervals (0: none; "
                             "default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--size-bins", type=float, nargs="+", default=list(DEFAULT_SIZE_BINS_UL),
                        metavar="UL", help="lesion-size bin edges in µL (default 10 25 50 100 250)")
    parser.add_argument("--ndsc-r", type=float, default=DEFAULT_NDSC_R,
                        help="reference lesion load r of the normalised Dice (default 0.001)")
    parser.add_argument("--longitudinal", action="store_true",
                        help="also evaluate the lesion change between sessions (new-lesion "
                             "detection, confusion of change classes) in EVAL_DIR/longitudinal")
    parser.add_argument("-o", "--output-dir", type=Path, default=None, metavar="EVAL_DIR",
                        help="where to write the results (default OUT_DIR/evaluation)")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Value checks argparse cannot express (exit 64) and input folders (exit 66)."""
    if not 0.0 < args.threshold <= 1.0:
        raise BidsClError(f"--threshold must be in (0, 1], got {args.threshold:g}", EXIT_USAGE)
    if args.bootstrap < 0:
        raise BidsClError(f"--bootstrap must be >= 0, got {args.bootstrap}", EXIT_USAGE)
    if not 0.0 < args.ndsc_r < 1.0:
        raise BidsClError(f"--ndsc-r must be in (0, 1), got {args.ndsc_r:g}", EXIT_USAGE)
    edges = args.size_bins
    if any(e <= 0 for e in edges) or any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=True)):
        raise BidsClError("--size-bins must be positive and increasing", EXIT_USAGE)
    if not args.out_dir.is_dir():
        raise BidsClError(f"output folder not found: {args.out_dir}", EXIT_MISSING_INPUT)
    if not args.reference.is_dir():
        raise BidsClError(f"reference folder not found: {args.reference}", EXIT_MISSING_INPUT)


def read_participants(path: Path | None) -> pd.DataFrame | None:
    """participants.tsv as strings (None when absent or without participant_id)."""
    if path is None:
        return None
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    return table if "participant_id" in table else None


def add_participant_columns(images: pd.DataFrame, participants: pd.DataFrame | None) -> pd.DataFrame:
    """Join participants.tsv columns; a per-image value (summary JSON) wins over the table's."""
    if participants is None:
        return images
    table = participants.drop_duplicates("participant_id").set_index("participant_id")
    for column in table.columns:
        from_table = images["participant_id"].map(table[column])
        if column in images:
            own = images[column]
            images[column] = own.where(own.notna() & (own.astype(str) != NA), from_table)
        else:
            images[column] = from_table
    return images


def write_tsv(table: pd.DataFrame, path: Path) -> None:
    table.to_csv(path, **TSV_OPTIONS)


def run(args: argparse.Namespace) -> int:
    validate_args(args)
    eval_dir: Path = args.output_dir or args.out_dir / "evaluation"
    predictions = find_predictions(args.out_dir, skip=eval_dir)
    if not predictions:
        raise BidsClError(
            f"no native-space *_label-CL_mask.nii.gz found under {args.out_dir}", EXIT_MISSING_INPUT
        )
    references = find_references(args.reference, args.label)
    pairs, missing, warnings = pair_masks(predictions, references)
    if args.longitudinal and not any(collect_changes(args.out_dir, p)
                                     for p in output_participants(args.out_dir)):
        raise BidsClError(
            f"--longitudinal: no lesion change outputs (*{spec.change_glob('change_summary')[1:]}) "
            f"under {args.out_dir}", EXIT_MISSING_INPUT)

    participants = read_participants(find_participants_tsv(args.reference))
    available = set(IMAGE_GROUP_COLUMNS) | set(participants.columns if participants is not None else ())
    unknown = [c for c in args.by if c not in available]
    if unknown:
        raise BidsClError(
            f"unknown --by column(s) {', '.join(unknown)}; available: {', '.join(sorted(available))}",
            EXIT_USAGE,
        )

    try:
        eval_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BidsClError(f"cannot create {eval_dir}: {exc}", EXIT_CANNOT_CREATE_OUTPUT) from exc
    missing_table = pd.DataFrame(
        [{"prefix": m.prefix, "missing": m.missing, "present": str(m.present)} for m in missing],
        columns=["prefix", "missing", "present"],
    )
    write_tsv(missing_table, eval_dir / "missing_pairs.tsv")
    if missing:
        print(f"Missing pairs ({len(missing)}):")
        for m in missing:
            print(f"  {m.prefix}: no {m.missing} (found {m.present})")
    if not pairs:
        raise BidsClError(
            f"none of the {len(predictions)} predictions has a reference "
            f"*_label-{args.label}_mask.nii.gz in {args.reference} "
            f"(listed in {eval_dir / 'missing_pairs.tsv'})",
            EXIT_MISSING_INPUT,
        )

    settings = EvaluationSettings(
        criterion=args.criterion, threshold=args.threshold,
        connectivity=args.connectivity, ndsc_r=args.ndsc_r, zero_division=args.zero_division,
    )
    image_rows, lesion_tables = [], []
    for pair in pairs:
        result = evaluate_pair(pair, settings, label=args.label)
        for warning in result.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        warnings += result.warnings
        image_rows.append(result.image)
        lesion_tables.append(result.lesions)
    images = add_participant_columns(pd.DataFrame(image_rows), participants)
    lesions = pd.concat([t for t in lesion_tables if len(t)] or lesion_tables, ignore_index=True)

    stats = {"n_boot": args.bootstrap, "seed": args.seed, "r": args.ndsc_r,
             "zero_division": args.zero_division}
    aggregate = summarise(images, **stats)
    groups = summarise_by(images, args.by, **stats) if args.by else None
    sizes = by_size(lesions, args.size_bins)
    types = by_type(lesions)

    write_tsv(images, eval_dir / "images.tsv")
    write_tsv(lesions, eval_dir / "lesions.tsv")
    write_tsv(aggregate, eval_dir / "aggregate.tsv")
    write_tsv(sizes, eval_dir / "by_size.tsv")
    if groups is not None:
        write_tsv(groups, eval_dir / "by_group.tsv")
    if types is not None:
        write_tsv(types, eval_dir / "by_type.tsv")
    settings_record = {
        "GeneratedBy": {"Name": PROG, "Version": __version__},
        "OutputDir": str(args.out_dir.resolve()),
        "Reference": str(args.reference.resolve()),
        "Label": args.label,
        "Criterion": args.criterion,
        "Threshold": args.threshold,
        "Connectivity": args.connectivity,
        "NDSC_r": args.ndsc_r,
        "ZeroDivision": args.zero_division,
        "ZeroDivisionRule": ZERO_DIVISION_RULES[args.zero_division],
        "Bootstrap": args.bootstrap,
        "Seed": args.seed,
        "SizeBins_uL": args.size_bins,
        "By": args.by,
        "ImagesEvaluated": len(pairs),
        "MissingPairs": len(missing),
        "Warnings": warnings,
    }
    (eval_dir / "settings.json").write_text(json.dumps(settings_record, indent=2) + "\n")
    (eval_dir / "summary.html").write_text(render_html(
        settings={k: v for k, v in settings_record.items() if k != "Warnings"},
        aggregate=aggregate, images=images, groups=groups, sizes=sizes, types=types,
        missing=missing_table, warnings=warnings,
    ))

    print(f"Evaluated {len(pairs)} image(s): criterion {args.criterion}"
          + (f" >= {args.threshold:g}" if args.criterion != "non_zero" else "")
          + f", {args.connectivity}-connectivity, 0/0 convention {args.zero_division},"
          f" {args.bootstrap} bootstrap resamples")
    print(aggregate_display(aggregate).to_string(index=False))
    if groups is not None:
        key = groups[groups["metric"].isin(["f1", "recall", "precision", "dice"])]
        wide = key.pivot_table(index=["by", "group"], columns="metric", values="mean", sort=False)
        print("\nMean by group:")
        print(wide.round(3).to_string())
    if args.longitudinal:
        run_longitudinal(args, eval_dir, settings)
    print(f"\nResults in {eval_dir}")
    return EXIT_OK


def run_longitudinal(args: argparse.Namespace, eval_dir: Path, settings: EvaluationSettings) -> None:
    """The longitudinal mode: EVAL_DIR/longitudinal/{pairs,aggregate,confusion,lesions}.tsv and
    settings.json (the conventions, docs/evaluation.md)."""
    results, found, warnings = evaluate_longitudinal(args.out_dir, args.reference, settings)
    for warning in warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    folder = eval_dir / LONGITUDINAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    pairs, confusion, lesions = longitudinal_tables(results)
    aggregate = summarise_pairs(pairs, n_boot=args.bootstrap, seed=args.seed,
                                zero_division=args.zero_division)
    write_tsv(pairs, folder / "pairs.tsv")
    write_tsv(aggregate, folder / "aggregate.tsv")
    write_tsv(confusion, folder / "confusion.tsv")
    write_tsv(lesions, folder / "lesions.tsv")
    refused = int(pairs["refused"].notna().sum()) if len(pairs) else 0
    record = {
        "GeneratedBy": {"Name": PROG, "Version": __version__},
        "OutputDir": str(args.out_dir.resolve()), "Reference": str(args.reference.resolve()),
        "Criterion": args.criterion, "Threshold": args.threshold,
        "Connectivity": args.connectivity, "ZeroDivision": args.zero_division,
        "ZeroDivisionRule": ZERO_DIVISION_RULES[args.zero_division],
        "Bootstrap": args.bootstrap, "Seed": args.seed,
        "PairsFound": found, "PairsEvaluated": len(results), "PairsRefused": refused,
        "Conventions": LONGITUDINAL_CONVENTIONS, "Warnings": warnings,
    }
    (folder / "settings.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nLongitudinal: {len(results)} pair(s) of sessions evaluated ({refused} refused, "
          f"left out), {found} found")
    if len(aggregate):
        print(aggregate[["metric", "n_pairs", "mean", "pooled", "pooled_ci_low", "pooled_ci_high"]]
              .round(3).to_string(index=False))
    print("Change classes (rows: truth, columns: predicted):")
    print(confusion.to_string(index=False))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of bids_cl-evaluate; returns the exit code."""
    return run_command(PROG, lambda: run(build_parser().parse_args(None if argv is None else list(argv))))


if __name__ == "__main__":
    raise SystemExit(main())
