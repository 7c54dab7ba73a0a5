"""``bids_cl-synth``: write a phantom BIDS dataset with cortical-lesion ground truth."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bids_cl._version import __version__
from bids_cl.synth.bids_io import IMAGE_DTYPES
from bids_cl.synth.generate import (
    FIELDS,
    ORIENTATION_CHOICES,
    SEQUENCES,
    SIZES,
    SynthOptions,
    write_dataset,
)
from bids_cl.utils.cli import UsageParser, run_command

PROG = "bids_cl-synth"


def _voxel_size(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a voxel size: {text!r} (e.g. 1,1,1.2)") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"need one or three positive sizes in mm, got {text!r}")
    return values  # type: ignore[return-value]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(
        prog=PROG,
        description="Write a synthetic multiple-sclerosis BIDS dataset (MP2RAGE/MPRAGE, 3T/7T) "
        "with cortical-lesion ground truth under OUT_DIR/derivatives/manual_masks.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="dataset folder to create (must be empty)")
    p.add_argument("--participants", type=int, default=2, metavar="N")
    p.add_argument("--sessions", type=int, default=1, metavar="K",
                   help="sessions per participant; later sessions add new and enlarging lesions")
    p.add_argument("--no-sessions", dest="use_sessions", action="store_false",
                   help="no ses- level (only with --sessions 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="same seed and options give a byte-identical dataset")
    p.add_argument("--field", choices=FIELDS, default="3T",
                   help="mixed alternates 3T and 7T between participants")
    p.add_argument("--sequence", choices=SEQUENCES, default="mp2rage",
                   help="both: MP2RAGE and MPRAGE in every session (acq-mp2rage/acq-mprage); "
                   "mixed: varies between participants")
    p.add_argument("--size", choices=SIZES, default="tiny",
                   help="tiny: 2 mm grid, enlarged lesions, seconds per participant (tests); "
                   "full: 1 mm at 3T, 0.75 mm at 7T")
    p.add_argument("--orientation", choices=ORIENTATION_CHOICES, default="RAS",
                   help="voxel-axis orientation of the images (mixed: random per image)")
    p.add_argument("--voxel-size", type=_voxel_size, default=None, metavar="X,Y,Z",
                   help="override the voxel size in mm, e.g. 1,1,1.2 (anisotropic)")
    p.add_argument("--dtype", choices=IMAGE_DTYPES, default="uint16",
                   help="on-disk type of the images; int16 stores them with scl_slope 0.125")
    p.add_argument("--uni-as-t1w", action="store_true",
                   help="file the MP2RAGE UNI image as acq-UNI_T1w instead of UNIT1")
    p.add_argument("--lesion-free-fraction", type=_fraction, default=0.2, metavar="F",
                   help="share of participants without any lesion (diagnosis HC)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bids_cl-synth``; returns the exit code."""
    return run_command(PROG, lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # progress lines of our own logger only (root-level config would echo other libraries)
    logger = logging.getLogger("bids_cl.synth")
    if not args.quiet and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    options = SynthOptions(
        participants=args.participants, sessions=args.sessions, seed=args.seed,
        field=args.field, sequence=args.sequence, size=args.size,
        orientation=args.orientation, voxel_size=args.voxel_size, dtype=args.dtype,
        uni_as_t1w=args.uni_as_t1w, lesion_free_fraction=args.lesion_free_fraction,
        use_sessions=args.use_sessions,
    )
    root = write_dataset(args.out_dir, options, overwrite=args.overwrite)
    if not args.quiet:
        print(root)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
