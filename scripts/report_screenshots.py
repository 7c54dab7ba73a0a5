"""Retake the report screenshots of docs/reports.md from a real phantom run.

    python scripts/report_screenshots.py /tmp/shots --screenshots docs/img

Runs what docs/reports.md describes: ``bids_cl-synth ROOT/bids --participants 4 --sessions 2 --size
tiny --seed 77``, ``bids_cl ROOT/bids ROOT/out participant --model demo --sloppy`` and ``bids_cl ROOT/bids
ROOT/out group`` (with the shipped demo model), then headless Chromium screenshots of one participant
report and of ``group.html``, saved as 256-colour PNGs (a third of the size, same look, kinder to git).
Without ``--screenshots`` it only builds the pages. A few minutes on a laptop CPU; needs ``chromium``
for the screenshots. ROOT is reused when it already holds the phantom dataset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_pages(root: Path, *, participants: int = 4, sessions: int = 2, seed: int = 77,
                nprocs: int = 2) -> Path:
    """Phantom dataset, participant and group levels under ``root``; returns the output folder."""
    from bids_cl.cli.run import main as bids_cl_main
    from bids_cl.synth.cli import main as synth_main

    bids_dir, out_dir = root / "bids", root / "out"
    if not (bids_dir / "dataset_description.json").is_file():
        code = synth_main([str(bids_dir), "--participants", str(participants), "--sessions",
                           str(sessions), "--size", "tiny", "--seed", str(seed)])
        if code:
            raise SystemExit(f"bids_cl-synth failed with exit code {code}")
    for level, extra in (("participant", ["--model", "demo", "--sloppy", "-w", str(root / "work"),
                                          "--nprocs", str(nprocs), "--omp-nthreads", "1"]),
                         ("group", [])):
        code = bids_cl_main([str(bids_dir), str(out_dir), level, *extra])
        if code:
            raise SystemExit(f"bids_cl {level} failed with exit code {code}")
    return out_dir


def take_screenshots(out_dir: Path, dest: Path, *, participant: str = "02") -> list[Path]:
    """``report_participant.png`` (sub-<participant>.html) and ``report_group.png`` in ``dest``."""
    from PIL import Image

    from bids_cl.reports.browser import screenshot

    shots = [screenshot(out_dir / f"sub-{participant}.html", dest / "report_participant.png",
                        width=1200, height=1900),
             screenshot(out_dir / "group.html", dest / "report_group.png", width=1200, height=1500)]
    for shot in shots:
        with Image.open(shot) as img:
            quantized = img.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
        quantized.save(shot, optimize=True)
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder for the phantom dataset, work and outputs")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="folder for report_participant.png and report_group.png (docs/img)")
    parser.add_argument("--participant", default="02", help="whose report to photograph")
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args(argv)
    out_dir = build_pages(args.root.absolute(), nprocs=args.nprocs)
    print(f"reports in {out_dir}; group page {out_dir / 'group.html'}")
    if args.screenshots is not None:
        for shot in take_screenshots(out_dir, args.screenshots, participant=args.participant):
            print(f"screenshot {shot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
