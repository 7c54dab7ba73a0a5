"""Measured longitudinal quality of a CL model on held-out 2- and 3-session phantoms (docs/longitudinal.md,
"Measured").

For each set: ``bids_cl-synth`` (seeds never used for the demo model's training, 1001-1003, nor for its
cross-sectional evaluation, 2001-2004, nor the README demo, 2026), the participant level with the model
(lesion change on, native space only) and ``bids_cl-evaluate --longitudinal``; then one markdown table of
new-lesion detection and one confusion matrix of change classes per set:

    python benchmarks/longitudinal_quality.py --root /tmp/longitudinal_eval --model demo

Every step is the public command line, printed before it runs; a rerun reuses the phantoms and Nipype's
work folder, so it only redoes what changed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd

SETS = {
    "long2": dict(participants=5, sessions=2, seed=4242),
    "long3": dict(participants=4, sessions=3, seed=4243),
}
COMMON_SYNTH = ["--field", "mixed", "--sequence", "mixed", "--size", "tiny", "-q"]


def _run(command: list[str]) -> None:
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_set(root: Path, name: str, model: str, nprocs: int) -> Path:
    options = SETS[name]
    bids, out, work = root / name, root / f"{name}_out", root / f"{name}_work"
    if not (bids / "dataset_description.json").is_file():
        _run([_bin("bids_cl-synth"), str(bids), "--participants", str(options["participants"]),
              "--sessions", str(options["sessions"]), "--seed", str(options["seed"]), *COMMON_SYNTH])
    _run([_bin("bids_cl"), str(bids), str(out), "participant", "--model", model, "-w", str(work),
          "--nprocs", str(nprocs), "--omp-nthreads", "1", "--output-spaces", "native"])
    evaluation = root / f"{name}_eval"
    _run([_bin("bids_cl-evaluate"), str(out), "--reference", str(bids / "derivatives" / "manual_masks"),
          "--longitudinal", "-o", str(evaluation)])
    return evaluation


def oracle_outputs(bids: Path, out: Path, seed: int = 42) -> Path:
    """Outputs of a perfect segmentation: every session's truth CL mask as its lesion mask, then the
    real change step (``longitudinal.pair``: alignment of the skull-stripped images by the truth brain
    masks, matching, classes) written by the one writer. Measures the change rules and the evaluation
    against the phantom course with no segmentation error."""
    import tempfile

    import nibabel as nib
    import numpy as np

    from bids_cl.derivatives import spec, writer
    from bids_cl.engine.lesions import lesion_table
    from bids_cl.evaluation.pairing import prefix_entities
    from bids_cl.longitudinal.pair import LabelledSession, align_files, change_from_labels
    from bids_cl.longitudinal.pairs import plan_pairs
    from bids_cl.utils.bids import WorkItem
    from bids_cl.utils.components import label_components

    truth = bids / "derivatives" / "manual_masks"
    items, sessions = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="bids_cl_oracle_"))
    for cl_path in sorted(truth.rglob("*" + spec.suffix_of("cl_mask", spec.REFERENCE))):
        prefix = cl_path.name[: -len(spec.suffix_of("cl_mask", spec.REFERENCE))]
        ent = prefix_entities(prefix)
        anat = bids / cl_path.parent.relative_to(truth)
        raw = next(p for p in (anat / f"{prefix}_UNIT1.nii.gz", anat / f"{prefix}_T1w.nii.gz")
                   if p.is_file())
        suffix = "UNIT1" if raw.name.endswith("_UNIT1.nii.gz") else "T1w"
        item = WorkItem(participant=ent["sub"], session=ent["ses"], target=str(raw),
                        target_suffix=suffix, prefix=prefix,
                        entities={"subject": ent["sub"], "session": ent["ses"],
                                  "acquisition": ent.get("acq")},
                        sequence="MP2RAGE" if suffix == "UNIT1" else "MPRAGE")
        cl_img = nib.load(cl_path)
        cl = np.asarray(cl_img.dataobj) > 0
        brain_mask = truth / cl_path.parent.relative_to(truth) / spec.reference_name(prefix,
                                                                                    "brain_mask")
        mask = np.asarray(nib.load(brain_mask).dataobj) > 0
        brain = tmp / f"{prefix}_brain.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(nib.load(raw).dataobj, np.float32) * mask,
                                 cl_img.affine), brain)
        labels, n = label_components(cl, 26)
        table = lesion_table(labels, n, cl.astype(np.float32), cl_img.affine)
        # what bids_cl-evaluate reads of a session: its lesion mask and the summary's connectivity
        folder = out / item.anat_dir
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(cl.astype(np.uint8), cl_img.affine),
                 folder / spec.output_name(prefix, "lesion_mask"))
        (folder / spec.output_name(prefix, "summary")).write_text(json.dumps({"Connectivity": 26}))
        items.append(item)
        sessions[prefix] = (LabelledSession(prefix, cl_img, labels, table, cl.astype(np.float32)),
                            str(brain), str(brain_mask))
    pairs, _ = plan_pairs(items)
    for pair in pairs:
        before, b_brain, b_mask = sessions[pair.earlier.prefix]
        after, a_brain, a_mask = sessions[pair.later.prefix]
        alignment = align_files(b_brain, b_mask, a_brain, a_mask, seed=seed)
        change = change_from_labels(before, after, alignment)
        writer.write_change_derivatives(out, pair.later, pair.earlier.session, table=change.table,
                                        dseg=change.dseg, summary=change.summary, sources=[])
    return out


def run_oracle(root: Path, name: str) -> Path:
    bids, out = root / name, root / f"{name}_oracle_out"
    print(f"# oracle outputs of {bids} (truth masks as predictions) in {out}", flush=True)
    oracle_outputs(bids, out)
    evaluation = root / f"{name}_oracle_eval"
    _run([_bin("bids_cl-evaluate"), str(out), "--reference", str(bids / "derivatives" / "manual_masks"),
          "--longitudinal", "-o", str(evaluation)])
    return evaluation


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)


def markdown(evaluations: dict[str, Path]) -> str:
    lines = ["| set | pairs (refused) | truth new | predicted new | TP | FP | USL | FN | new-lesion F1 "
             "(pooled [95% CI]) | recall | precision | mean F1 over pairs | class agreement | "
             "cross-sectional F1 (pooled) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    confusions = []
    for name, folder in evaluations.items():
        pairs = _read(folder / "longitudinal" / "pairs.tsv")
        usable = pairs[pairs["refused"].isna()]
        agg = _read(folder / "longitudinal" / "aggregate.tsv").set_index("metric")
        cross = _read(folder / "aggregate.tsv").set_index("metric")
        lesions = _read(folder / "longitudinal" / "lesions.tsv")
        agreement = (lesions["truth_class"] == lesions["predicted_class"]).mean() \
            if len(lesions) else float("nan")
        s = {c: int(usable[c].sum()) for c in ("truth_new", "pred_new", "new_tp", "new_fp",
                                                "new_usl", "new_fn")}
        f1 = agg.loc["new_f1"]
        base = name.split()[0]
        label = f"{name} ({SETS[base]['sessions']} sessions, seed {SETS[base]['seed']})"
        lines.append(
            f"| {label} | {len(pairs)} "
            f"({len(pairs) - len(usable)}) | {s['truth_new']} | {s['pred_new']} | {s['new_tp']} | "
            f"{s['new_fp']} | {s['new_usl']} | {s['new_fn']} | {f1['pooled']:.2f} "
            f"[{f1['pooled_ci_low']:.2f}, {f1['pooled_ci_high']:.2f}] | "
            f"{agg.loc['new_recall', 'pooled']:.2f} | {agg.loc['new_precision', 'pooled']:.2f} | "
            f"{f1['mean']:.2f} | {agreement:.2f} | {cross.loc['f1', 'pooled']:.2f} |")
        confusion = _read(folder / "longitudinal" / "confusion.tsv")
        head = "| truth \\ predicted | " + " | ".join(confusion.columns[2:]) + " | n |"
        rows = [f"| {r['truth_class']} | " + " | ".join(str(int(r[c])) for c in confusion.columns[2:])
                + f" | {int(r['n'])} |" for _, r in confusion.iterrows()]
        confusions.append("\n".join([f"\n{name}:\n", head,
                                     "|---" * (len(confusion.columns)) + "|", *rows]))
    return "\n".join(lines) + "\n" + "\n".join(confusions) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    parser.add_argument("--table-only", action="store_true",
                        help="only print the table from the evaluation folders under --root")
    parser.add_argument("--oracle", action="store_true",
                        help="also evaluate a perfect segmentation (the truth masks) through the same "
                             "change step (rows '<set> truth masks')")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    evaluations = {}
    for name in args.sets:
        evaluations[name] = (args.root / f"{name}_eval" if args.table_only
                             else run_set(args.root, name, args.model, args.nprocs))
        if args.oracle:
            evaluations[f"{name} truth masks"] = (
                args.root / f"{name}_oracle_eval" if args.table_only else run_oracle(args.root, name))
    text = markdown(evaluations)
    print(text)
    (args.root / "longitudinal_quality.md").write_text(text)
    (args.root / "sets.json").write_text(json.dumps(SETS, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
