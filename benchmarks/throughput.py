"""Participants per hour: one run over N participants against N runs one at a time (issue 20).

    python benchmarks/throughput.py                                    # 8 participants, demo, CPU
    python benchmarks/throughput.py --device cuda --model paper        # a GPU node (benchmarks/gpu_check.sh)
    python benchmarks/throughput.py --participants 2 --size tiny       # a smoke test of this script
    python benchmarks/throughput.py --segment-worker auto              # only the run's default mode

On one ``bids_cl-synth`` dataset of ``--participants`` MP2RAGE participants (one session each), in one run:

* **one at a time**: ``bids_cl BIDS OUT participant --participant-label XX`` for each participant in turn,
  each a fresh process (what a user gets from a loop, or from one small job per participant);
* **together**: one ``bids_cl BIDS OUT participant`` over all of them, with the same ``--nprocs``: Nipype's
  MultiProc runs the stages of different participants side by side. On a GPU run the segmentation nodes
  are GPU nodes (one at a time on the GPU, ``n_gpu_procs``) holding two CPU slots, and the default
  ``--omp-nthreads`` leaves those free, so skull stripping and registration of other participants run
  while the GPU works.

The run together is made once per ``--segment-worker`` mode (default: both ``shared``, one worker that
loads the model once and pipelines the images, and ``node``, each segment node loading the model itself),
so their ratio is measured side by side too.

Printed: wall time and participants per hour of each, their ratio, and for each run together the
stage-seconds (from each target's record) over the wall time: how many stages ran at once on average, and
how much of the wall time the segmentation stage (the GPU, on a GPU run) was busy; with a shared worker
also the model set-up seconds of the run (once) and how long images waited inside the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_cli(args: list[str]) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                    env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bids_cl.cli.run", *args], env=env, capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bids_cl {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall


def summed_timings(out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds summed over every target record of the run in ``out``: per stage (registrations to any
    space as ``register``), and per part of the segmentation (``segment.load_model``,
    ``segment.worker_wait``, ... without the prefix; already counted in its stage)."""
    from bids_cl.derivatives import spec

    stages: dict[str, float] = {}
    segment_parts: dict[str, float] = {}
    for record in sorted(out.glob(f"sub-*/log/*/{spec.RECORDS_DIR}/*.json")):
        for stage, seconds in (json.loads(record.read_text()).get("timings") or {}).items():
            if stage.startswith("segment."):
                totals, key = segment_parts, stage.removeprefix("segment.")
            elif "." in stage:
                continue
            else:
                totals, key = stages, "register" if stage.startswith("register") else stage
            totals[key] = totals.get(key, 0.0) + float(seconds)
    return stages, segment_parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=8)
    parser.add_argument("--model", default="demo", help="demo, paper (5-fold, random weights) or a path")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--nprocs", type=int, default=None, help="CPUs (default: all allowed)")
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--root", help="work folder (kept; the dataset and models are reused)")
    parser.add_argument("--segment-worker", choices=["both", "auto", "shared", "node"], default="both",
                        help="mode(s) of the runs together (both: shared and node, side by side)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    from bids_cl.synth import generate_dataset

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from participant import paper_model, work_root  # benchmarks/participant.py: the same model and setup

    nprocs = args.nprocs or len(os.sched_getaffinity(0))
    root = work_root(args.root, "bids_cl_throughput.")
    bids = root / "bids"
    if not (bids / "dataset_description.json").is_file():
        generate_dataset(bids, participants=args.participants, sessions=1, seed=args.seed, size=args.size,
                         sequence="mp2rage", lesion_free_fraction=0.0)
    labels = sorted(p.name.removeprefix("sub-") for p in bids.glob("sub-*") if p.is_dir())
    model = str(paper_model(root)) if args.model == "paper" else args.model
    common = ["--model", model, "--nprocs", str(nprocs), "--device", args.device]
    print(f"{len(labels)} participants ({args.size} MP2RAGE phantoms), model {args.model}, device "
          f"{args.device}, {nprocs} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)

    modes = ["shared", "node"] if args.segment_worker == "both" else [args.segment_worker]
    for sub in ("alone", *(f"together-{m}" for m in modes)):
        shutil.rmtree(root / sub, ignore_errors=True)
    alone = 0.0
    for label in labels:
        alone += run_cli([str(bids), str(root / "alone" / "out"), "participant", "--participant-label", label,
                          "-w", str(root / "alone" / f"work-{label}"), *common])
        print(f"  one at a time: sub-{label} done ({alone:.1f} s so far)", flush=True)
    n = len(labels)
    fig: dict[str, Any] = {
        "participants": n, "model": args.model, "device": args.device, "nprocs": nprocs,
        "one_at_a_time_s": round(alone, 1), "per_hour_one_at_a_time": round(n * 3600 / alone, 1),
        "together": {},
    }
    print(f"\none at a time: {alone:.1f} s ({fig['per_hour_one_at_a_time']} participants/hour)")
    for mode in modes:
        folder = root / f"together-{mode}"
        together = run_cli([str(bids), str(folder / "out"), "participant", "-w", str(folder / "work"),
                            "--segment-worker", mode, *common])
        stages, parts = summed_timings(folder / "out")
        run = {
            "wall_s": round(together, 1), "per_hour": round(n * 3600 / together, 1),
            "ratio_to_one_at_a_time": round(alone / together, 2),
            "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
            "stages_at_once": round(sum(stages.values()) / together, 2),
            "segment_busy_fraction": round(stages.get("segment", 0.0) / together, 2),
            "model_setup_s": round(parts.get("load_model", 0.0), 1),
            "worker_wait_s": round(parts.get("worker_wait", 0.0), 1),
        }
        fig["together"][mode] = run
        print(f"together, --segment-worker {mode}: {together:.1f} s ({run['per_hour']} participants/hour): "
              f"{run['ratio_to_one_at_a_time']:.2f}x the throughput of one at a time")
        print(f"  stage-seconds {run['stage_seconds']}; {run['stages_at_once']:.2f} stages at once on "
              f"average; segmentation{' (GPU)' if args.device == 'cuda' else ''} busy "
              f"{100 * run['segment_busy_fraction']:.0f} % of the wall time; model set-up "
              f"{run['model_setup_s']} s in all; waiting inside the worker {run['worker_wait_s']} s in all")
    if len(modes) == 2:
        shared, node = (fig["together"][m]["wall_s"] for m in modes)
        fig["shared_over_node"] = round(node / shared, 2)
        print(f"shared worker against a model per node: {fig['shared_over_node']:.2f}x "
              f"({shared:.1f} s against {node:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
