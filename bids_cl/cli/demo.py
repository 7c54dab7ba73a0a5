"""``bids_cl-demo OUT``: the README's main job on a fresh machine, in a few minutes.

Generates a small phantom BIDS dataset with ground-truth cortical lesions, runs the participant and
group levels with the embedded demo model, scores the result against the truth with the paper's
lesion-wise metrics, and prints where everything is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bids_cl.derivatives import spec
from bids_cl.derivatives.reader import collect_targets, output_participants
from bids_cl.utils.cli import UsageParser, run_command

DEMO_WARNING = ("The demo model was trained on synthetic phantoms: not for clinical or research use; "
                "install the published model for real data (bids_cl-models install published).")


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="bids_cl-demo", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for the phantom dataset and outputs")
    parser.add_argument("--participants", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--seed", type=int, default=2026, help="phantom seed (held out from the "
                        "demo model's training seeds)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--output-spaces", nargs="*", default=["MNI152NLin2009aSym"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bids_cl-demo``; returns the exit code."""
    return run_command("bids_cl-demo", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from bids_cl.cli.run import main as bids_cl_main
    from bids_cl.synth import generate_dataset

    out = args.out_dir.resolve()
    bids_dir = out / "bids"
    derivatives = out / "derivatives" / "bids_cl"
    if not (bids_dir / "dataset_description.json").is_file():
        print(f"bids_cl-demo: generating a {args.size} phantom dataset in {bids_dir}")
        generate_dataset(bids_dir, participants=args.participants, sessions=args.sessions,
                         seed=args.seed, size=args.size, sequence="both", field="mixed")
    common = [str(bids_dir), str(derivatives)]
    participant_args = [*common, "participant", "--model", "demo", "-w", str(out / "work"),
                        "--nprocs", str(args.nprocs), "--omp-nthreads", "1", "--sloppy",
                        "--output-spaces", *args.output_spaces]
    print("bids_cl-demo: running  bids_cl " + " ".join(participant_args))
    code = bids_cl_main(participant_args)
    if code != 0:
        print(f"bids_cl-demo: the participant level failed with exit code {code}", file=sys.stderr)
        return code
    code = bids_cl_main([*common, "group"])
    if code != 0:
        print(f"bids_cl-demo: the group level failed with exit code {code}", file=sys.stderr)
        return code

    from bids_cl.evaluation.cli import main as evaluate_main

    evaluate_main([str(derivatives), "--reference", str(bids_dir / "derivatives" / "manual_masks"),
                   "-o", str(out / "evaluation")])
    print()
    print("Lesion counts (bids_cl vs phantom truth):")
    for participant in output_participants(derivatives):
        for target in collect_targets(derivatives, participant):
            truth = _truth_count(bids_dir, target.anat_dir.relative_to(derivatives), target.prefix)
            print(f"  {target.prefix:40s} found {target.summary['LesionCount']:3d}   truth {truth}")
    print()
    print(f"Derivatives:          {derivatives}")
    print(f"Participant reports:  {derivatives}/{spec.report_name('*')}")
    print(f"Methods text to cite: {derivatives / spec.CITATION_NAME}")
    print(f"Group summary:        {derivatives / 'group.html'}")
    print(f"Evaluation vs truth:  {out / 'evaluation'}")
    print(DEMO_WARNING)
    return 0


def _truth_count(bids_dir: Path, rel_anat: Path, prefix: str) -> str:
    import pandas as pd

    table = (bids_dir / "derivatives" / "manual_masks" / rel_anat
             / spec.reference_name(prefix, "lesions_table"))
    if not table.is_file():
        return "n/a"
    truth = pd.read_csv(table, sep="\t")
    # a phantom lesion that disappeared since the previous session has a row of volume 0
    return str(int(((truth["label"] == "CL") & (truth["volume_ul"] > 0)).sum()))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
