"""``bids_cl-train``: train or fine-tune a cortical-lesion nnU-Net model on a BIDS dataset with manual masks.

Example (a lab fine-tuning the demo model on its own annotations)::

    bids_cl-train /data/bids /data/bids/derivatives/manual_masks /scratch/cl_train \\
        --from-model demo --epochs 100 --device cuda --output-model /models/lab_cl

See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bids_cl.errors import EXIT_OK, EXIT_USAGE, BidsClError
from bids_cl.train.convert import preproc_strategies
from bids_cl.train.plans import SMALL_NETWORK, NetworkSpec, _as_tuple3
from bids_cl.train.run import DEFAULT_WARNING, STEPS, TrainOptions, run
from bids_cl.train.trainers import TrainerSettings
from bids_cl.utils.cli import UsageParser, run_command

if TYPE_CHECKING:
    from bids_cl.engine.models import ResolvedModel


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog="bids_cl-train",
        description="Convert a BIDS dataset with manual <prefix>_label-CL_mask.nii.gz files into an nnU-Net "
                    "dataset (same skull stripping and RAS reorientation as bids_cl), plan, preprocess and "
                    "train with nnU-Net v2, and write a bids_cl model folder.")
    p.add_argument("bids_dir", type=Path, help="BIDS dataset with *_UNIT1 / *_T1w images")
    p.add_argument("labels_dir", type=Path,
                   help="folder (searched recursively) with <prefix>_label-CL_mask.nii.gz per image; "
                        "images without one are skipped, lesion-free images need an empty mask")
    p.add_argument("work_dir", type=Path, help="work folder (nnU-Net raw/preprocessed/results live here)")
    p.add_argument("--output-model", type=Path, help="model folder to write (default WORK_DIR/model)")

    g = p.add_argument_group("data")
    g.add_argument("--participant-label", nargs="+", help="only these participants (sub- optional)")
    g.add_argument("--sequence", nargs="+", choices=("MP2RAGE", "MPRAGE"), help="only these sequences")
    g.add_argument("--skull-strip", default="auto", choices=preproc_strategies(),
                   help="as bids_cl's --skull-strip; 'truth-mask' uses <prefix>_desc-brain_mask.nii.gz from "
                        "LABELS_DIR (a training shortcut for phantoms), 'none' for already stripped images")
    g.add_argument("--synthstrip-model", help="SynthStrip weights (synthstrip.1.pt), as for bids_cl")

    g = p.add_argument_group("network and plans")
    g.add_argument("--from-model", type=str,
                   help="fine-tune: reuse this model's plans and start from its weights; a name ('demo', an "
                        "installed model), folder or export zip, lock-checked as for bids_cl --model; "
                        "its network is kept (only --batch-size and --batch-dice may change)")
    g.add_argument("--target-spacing", type=float, default=1.0,
                   help="isotropic spacing in mm (default 1; a --from-model fine-tune keeps the model's)")
    g.add_argument("--small-network", action="store_true",
                   help="the demo model's reduced network (4 stages, 12-96 features, 32^3 patch, batch 4)")
    g.add_argument("--max-stages", type=int)
    g.add_argument("--base-features", type=int)
    g.add_argument("--max-features", type=int)
    g.add_argument("--patch-size", type=int, nargs="+", help="one or three integers")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--batch-dice", action=argparse.BooleanOptionalAction, default=None,
                   help="Dice over the batch rather than per patch (on with --small-network)")
    g.add_argument("--dataset-id", type=int, default=501)
    g.add_argument("--dataset-name", default="BidsClCL")

    g = p.add_argument_group("training schedule")
    d = TrainerSettings()
    g.add_argument("--epochs", type=int, default=d.num_epochs)
    g.add_argument("--iterations-per-epoch", type=int, default=d.iterations_per_epoch)
    g.add_argument("--val-iterations", type=int, default=d.val_iterations)
    g.add_argument("--learning-rate", type=float, default=d.initial_lr)
    g.add_argument("--save-every", type=int, default=d.save_every)
    g.add_argument("--time-budget-min", type=float,
                   help="stop after this many minutes of training (learning rate decays to match)")
    g.add_argument("--oversample-foreground", type=float, help="nnU-Net default 0.33")
    g.add_argument("--foreground-offset", type=float, default=d.foreground_offset,
                   help="move lesion-forced patches so the lesion lands within this fraction of half a patch "
                        "from the centre (0 = nnU-Net: always at the centre; the demo model uses 0.8)")
    g.add_argument("--folds", type=int, default=1,
                   help="1 (default): one model, participants split train/validation by --val-fraction; "
                        "k>1: k-fold cross-validation by participant, k models (an ensemble)")
    g.add_argument("--val-fraction", type=float, default=0.2)
    g.add_argument("--split-seed", type=int, default=0)
    g.add_argument("--validate", action="store_true", help="run nnU-Net's full validation after training")

    g = p.add_argument_group("resources")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--nthreads", type=int, default=1, help="CPU threads (torch, preprocessing)")
    g.add_argument("--n-proc-da", type=int, default=1,
                   help="nnU-Net data-augmentation worker processes (0 = in the main process)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    g.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))

    g = p.add_argument_group("model description (bids_cl_model.json)")
    g.add_argument("--name", default="custom")
    g.add_argument("--description", default="")
    g.add_argument("--warning", default=DEFAULT_WARNING)
    return p


# Options that reshape the planned network or its patch. A fine-tune keeps the source model's plans (its
# weights fit only that network), so these would be silently ignored there: refuse them instead.
ARCHITECTURE_OPTIONS = ("small_network", "max_stages", "base_features", "max_features", "patch_size")


def _network(args: argparse.Namespace) -> NetworkSpec:
    if args.from_model is not None:
        given = [f"--{name.replace('_', '-')}" for name in ARCHITECTURE_OPTIONS if getattr(args, name)]
        if given:
            raise BidsClError(f"{', '.join(given)}: cannot change the network of --from-model "
                              f"{args.from_model} (fine-tuning keeps its plans; --batch-size and "
                              "--batch-dice may change)", EXIT_USAGE)
    base = SMALL_NETWORK if args.small_network else NetworkSpec()
    return NetworkSpec(
        max_stages=args.max_stages if args.max_stages is not None else base.max_stages,
        base_features=args.base_features if args.base_features is not None else base.base_features,
        max_features=args.max_features if args.max_features is not None else base.max_features,
        patch_size=_as_tuple3(args.patch_size) if args.patch_size else base.patch_size,
        batch_size=args.batch_size if args.batch_size is not None else base.batch_size,
        batch_dice=args.batch_dice if args.batch_dice is not None else base.batch_dice)


def _source_model(value: str | None) -> ResolvedModel | None:
    """The model a fine-tune starts from, found and trust-checked exactly as ``bids_cl --model`` does it.

    A name (``demo``, an installed model), a folder or an export zip; a lock file, where there is one,
    must match before its pickled checkpoints are loaded.
    """
    if value is None:
        return None
    # Import-light (no torch/nnU-Net): the nnU-Net environment is set up later, by run().
    from bids_cl.engine.models import resolve_model

    source = resolve_model(value)
    if not (source.model_dir / "plans.json").is_file():
        raise BidsClError(f"--from-model {value}: {source.model_dir} has no plans.json, which fine-tuning "
                          "reuses", EXIT_USAGE)
    return source


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    settings = TrainerSettings(
        num_epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
        val_iterations=args.val_iterations, initial_lr=args.learning_rate, save_every=args.save_every,
        time_budget_s=args.time_budget_min * 60 if args.time_budget_min else None,
        oversample_foreground=args.oversample_foreground, foreground_offset=args.foreground_offset)
    return TrainOptions(
        bids_dir=args.bids_dir, labels_dir=args.labels_dir, work_dir=args.work_dir,
        output_model=args.output_model, participants=args.participant_label, sequences=args.sequence,
        skull_strip=args.skull_strip, synthstrip_model=args.synthstrip_model, dataset_id=args.dataset_id,
        dataset_name=args.dataset_name, target_spacing=args.target_spacing, network=_network(args),
        from_model=_source_model(args.from_model), folds=args.folds, val_fraction=args.val_fraction,
        split_seed=args.split_seed, settings=settings, device=args.device, nthreads=args.nthreads,
        n_proc_da=args.n_proc_da, steps=tuple(args.steps), validate=args.validate, compile=args.compile,
        name=args.name, description=args.description, warning=args.warning)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bids_cl-train``; returns the exit code."""
    return run_command("bids_cl-train", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    run(options_from_args(build_parser().parse_args(argv)))
    return EXIT_OK


if __name__ == "__main__":  # nnU-Net's worker processes re-import the main module: keep this guard
    sys.exit(main())
