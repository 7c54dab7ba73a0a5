"""The participant workflow with a paper-sized 5-fold model on full-size 3T (1 mm) and 7T (0.75 mm) phantoms.

    python benchmarks/paper_model.py                          # both fields, one after the other (CPU: long)
    python benchmarks/paper_model.py --fields 3T 7T --jobs 2  # both runs at once (memory is per process)
    python benchmarks/paper_model.py --fields 7T --root /tmp/paper_bench --json /tmp/paper_bench/7T.json
    # a smoke test of this script (tiny network and phantoms, minutes):
    python benchmarks/paper_model.py --network tiny --size tiny --folds 2 --sloppy --root /tmp/pb_smoke

What it does, for each field strength:

1. a random-weight model with Molchanova et al.'s plans (PlainConvUNet, 6 stages 32..320, patch
   112 x 128 x 160, 1 mm; ``benchmarks/inference.py``'s ``paper`` network, built with
   ``bids_cl.engine.testing``), ``--folds`` folds with different seeds; a background bias
   (``--bg-bias``) so that lesions are a minority of the brain, as for a trained model;
2. one full-size MP2RAGE phantom participant: ``bids_cl-synth --size full --field 3T|7T``;
3. the real command, ``bids_cl BIDS OUT participant --model MODEL`` with the default settings (device
   auto = CPU here, default output space, so registration runs), except one: ``--use-plugin`` with
   ``plugin: LegacyMultiProc``, whose workers bids_cl starts with ``maxtasksperchild: 1``, so every node runs
   in a fresh process of its own (Nipype's default MultiProc reuses its workers, and the peak of a reused
   process is not one node's);
4. from outside (Nipype's resource monitor stays off, as for users), every ``--interval`` seconds: every
   process of the run's tree, its resident memory (``VmRSS``), its peak so far (``VmHWM``, exact, kept
   by the kernel) and its working directory, which Nipype sets to the node's folder while the node runs:
   that names the node of each process. A node's peak = the sum of the ``VmHWM`` of its processes (the
   worker and its children, e.g. the antspyx registration subprocess): exact, an upper bound of their
   peak together. ``sampled`` = the largest sum of their ``VmRSS`` at one sample. A forked worker starts
   with the runner's resident pages (counted, as a fresh process would load Nipype too). The node
   ``write_derivatives`` runs inside the runner (``run_without_submitting``): its figure is the runner's
   sampled RSS while in its folder; ``runner`` is the runner's own peak (discovery, validation, report);
5. checks the derivatives of docs/dev/architecture.md's layout are all there, the participant report
   ``sub-<label>.html`` exists, and the lesion table's fold-disagreement ``uncertainty`` is not all 0;
6. prints per node: wall seconds (first to last sample in its folder), peak RSS GiB, sampled GiB, and
   the declared ``mem_gb`` of ``bids_cl/workflows/base.py``;
7. with ``--isolated-segment N ...``: the segment node's function (``steps.segment_files``) alone on each
   run's skull-stripped image, in a fresh process under ``/usr/bin/time -v``, with N threads (= N CPU
   tile workers, at most 4: what any machine with 4 or more CPUs runs by default); ``--no-workflow``
   does only this, on the folders of the last run:

    python benchmarks/paper_model.py --fields 7T 3T --no-workflow --isolated-segment 4 2

The run folders under ``--root`` are deleted and remade on each run (a reused work folder would make
Nipype skip the cached nodes); the model and the phantoms are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from inference import make_model  # noqa: E402  (the paper network's plans live there, once)

from bids_cl.config import DEFAULT_OUTPUT_SPACES  # noqa: E402
from bids_cl.derivatives import spec  # noqa: E402
from bids_cl.workflows import base as wf_base  # noqa: E402

#: node folder name -> declared memory (GB) in bids_cl/workflows/base.py
DECLARED = {
    "skullstrip": wf_base.SKULLSTRIP_MEM_GB,
    "segment": wf_base.SEGMENT_MEM_GB,
    "register": wf_base.REGISTER_MEM_GB,
    "resample": wf_base.RESAMPLE_MEM_GB,
    "write_derivatives": None,  # run_without_submitting: runs in the runner
}
NODES = tuple(DECLARED)
RUNNER = "runner"
GIB = 1024 ** 3
# Outputs with a JSON sidecar (docs/dev/architecture.md's layout: "(+.json ...)").
WITH_SIDECAR = ("brain_mask", "preproc", "probseg", "lesion_mask", "lesions")
LOG_FILES = ("bids_cl.toml", "discovery.json", "bids_cl.log", "timings.json")


# ------------------------------------------------------------------ measuring a process tree

def _read_status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes, or None when the process is gone (or a kernel thread)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    if len(values) < 2:
        return None
    return values["VmRSS"], values["VmHWM"]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (with the pid, a key that survives pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            kids.extend(int(k) for k in text.split())
    except OSError:
        pass
    return kids


def _tree(root: int) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(_children(pid))
    return found


def node_of(cwd: str) -> str | None:
    """The workflow node whose folder ``cwd`` is in (``.../register/mapflow/_register0`` -> register)."""
    for part in reversed(Path(cwd).parts):
        name = part.lstrip("_").rstrip("0123456789")
        if name in NODES:
            return name
    return None


@dataclass
class NodeUsage:
    first: float = float("inf")
    last: float = float("-inf")
    hwm: dict[tuple[int, str], int] = field(default_factory=dict)  # worker processes only
    sampled: int = 0

    def seen(self, t: float) -> None:
        self.first, self.last = min(self.first, t), max(self.last, t)

    @property
    def wall(self) -> float:
        return max(0.0, self.last - self.first)

    @property
    def peak(self) -> int:
        return sum(self.hwm.values()) if self.hwm else self.sampled


@dataclass
class TreeMonitor:
    """Samples one run's process tree; attributes each process to a node by its working directory."""

    root_pid: int
    interval: float = 0.2
    nodes: dict[str, NodeUsage] = field(default_factory=dict)
    runner_hwm: int = 0
    samples: int = 0
    _node_of_proc: dict[tuple[int, str], str] = field(default_factory=dict)

    def sample(self) -> None:
        now = time.monotonic()
        per_node: dict[str, int] = {}
        for pid in _tree(self.root_pid):
            status, started = _read_status(pid), _start_time(pid)
            if status is None or started is None:
                continue
            rss, hwm = status
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            node = node_of(cwd)
            key = (pid, started)
            if pid == self.root_pid:
                self.runner_hwm = max(self.runner_hwm, hwm)
                if node is None:
                    continue
            elif node is None:  # an idle pool worker, or a child not yet in a node folder
                node = self._node_of_proc.get(key)
                if node is None:
                    continue
            else:
                self._node_of_proc[key] = node
            usage = self.nodes.setdefault(node, NodeUsage())
            usage.seen(now)
            if pid != self.root_pid:
                usage.hwm[key] = max(usage.hwm.get(key, 0), hwm)
            per_node[node] = per_node.get(node, 0) + rss
        for node, rss in per_node.items():
            self.nodes[node].sampled = max(self.nodes[node].sampled, rss)
        self.samples += 1


def monitor(proc: subprocess.Popen, mon: TreeMonitor) -> threading.Thread:
    def loop() -> None:
        while proc.poll() is None:
            mon.sample()
            time.sleep(mon.interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------ data, run, checks

def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def make_phantom(root: Path, field_strength: str, seed: int, size: str = "full",
                 voxel_size: float | None = None) -> Path:
    """One MP2RAGE participant (reused when present); ``voxel_size`` overrides the field's (e.g. 0.5)."""
    grid = "" if voxel_size is None else f"_{voxel_size:g}mm"
    bids = root / f"phantom_{size}_{field_strength}{grid}_seed{seed}"
    if (bids / "dataset_description.json").is_file():
        return bids
    if bids.exists():
        shutil.rmtree(bids)
    extra = [] if voxel_size is None else ["--voxel-size", ",".join([f"{voxel_size:g}"] * 3)]
    subprocess.run([bin_path("bids_cl-synth"), str(bids), "--participants", "1", "--size", size,
                    "--field", field_strength, "--sequence", "mp2rage", "--seed", str(seed),
                    "--lesion-free-fraction", "0", "-q", *extra], check=True)
    return bids


def participant_command(bids: Path, out: Path, work: Path, model: Path, plugin_file: Path,
                        extra: list[str]) -> list[str]:
    return [bin_path("bids_cl"), str(bids), str(out), "participant", "-w", str(work),
            "--model", str(model), "--use-plugin", str(plugin_file), *extra]


def check_outputs(out: Path, spaces: list[str]) -> dict:
    """Every file of docs/dev/architecture.md's layout for each target, and the uncertainty column."""
    import pandas as pd

    missing: list[str] = []
    for name in ("dataset_description.json", ".bidsignore", "descriptions.tsv", "CITATION.md"):
        if not (out / name).is_file():
            missing.append(name)
    summaries = sorted(out.glob(f"sub-*/**/anat/{spec.summary_glob()}"))
    if not summaries:
        missing.append("sub-*/[ses-*/]anat/*" + spec.output_name("X", "summary").removeprefix("X"))
    report: dict = {"targets": []}
    for summary_path in summaries:
        prefix = spec.prefix_of_summary(summary_path.name)
        anat = summary_path.parent
        participant = summary_path.relative_to(out).parts[0]
        summary = json.loads(summary_path.read_text())
        names = []
        for key, output in spec.OUTPUTS.items():
            placeholders = set(re.findall(r"{(\w+)}", json.dumps(output.entities)))
            if placeholders - {"space"}:  # longitudinal outputs need an earlier session: not here
                continue
            if placeholders:
                names += [spec.output_name(prefix, key, space=s) for s in spaces]
            else:
                names.append(spec.output_name(prefix, key))
        names += [spec.sidecar_name(spec.output_name(prefix, key)) for key in WITH_SIDECAR]
        missing += [str((anat / n).relative_to(out)) for n in names if not (anat / n).is_file()]
        if not (out / f"{participant}.html").is_file():
            missing.append(f"{participant}.html")
        figures = list((out / participant / "figures").glob(f"{prefix}_desc-*"))
        if not figures:
            missing.append(f"{participant}/figures/{prefix}_desc-*")
        logs = sorted((out / participant / "log").glob("*/"))
        log = logs[-1] if logs else out / participant / "log" / "<run_uuid>"
        missing += [str((log / n).relative_to(out)) for n in LOG_FILES if not (log / n).is_file()]
        if not (log / spec.RECORDS_DIR / f"{prefix}.json").is_file():
            missing.append(str((log / spec.RECORDS_DIR / f"{prefix}.json").relative_to(out)))
        table = pd.read_csv(anat / spec.output_name(prefix, "lesions"), sep="\t")
        unc = table["uncertainty"] if "uncertainty" in table else pd.Series(dtype=float)
        report["targets"].append({
            "prefix": prefix, "spaces": spaces, "lesions": len(table),
            "template_columns": all(c in table for c in spec.TEMPLATE_COLUMNS),
            "uncertainty_nonzero": int((unc > 0).sum()),
            "uncertainty": [round(float(q), 3) for q in unc.quantile([0, 0.5, 1])] if len(unc) else [],
            "ood_warning": summary.get("OODWarning"),
            "threshold": summary.get("Threshold"), "folds": summary.get("Folds"),
            "skullstrip": summary.get("SkullStripStrategy"),
        })
    report["missing"] = missing
    return report


@dataclass
class Run:
    field_strength: str
    bids: Path
    out: Path
    work: Path
    log: Path
    command: list[str]
    proc: subprocess.Popen | None = None
    mon: TreeMonitor | None = None
    thread: threading.Thread | None = None
    started: float = 0.0
    seconds: float = 0.0
    exit_code: int | None = None


def start(run: Run, interval: float) -> None:
    for folder in (run.out, run.work):
        if folder.exists():
            shutil.rmtree(folder)
    run.started = time.monotonic()
    with open(run.log, "w") as log:
        run.proc = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=run.work.parent)
    run.mon = TreeMonitor(run.proc.pid, interval=interval)
    run.thread = monitor(run.proc, run.mon)


def finish(run: Run) -> int:
    assert run.proc is not None and run.thread is not None
    code = run.proc.wait()
    run.thread.join()
    run.seconds = time.monotonic() - run.started
    return code


def isolated_segment(work: Path, model: Path, threads: int, dest: Path) -> tuple[float, float]:
    """``steps.segment_files`` on a finished run's skull-stripped image, in a fresh process under
    ``/usr/bin/time -v``, with ``threads`` threads (so that many CPU tile workers, up to 4): (wall s, GiB)."""
    strip = next(work.glob("bids_cl_wf/*/*/skullstrip"))
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    code = ("from bids_cl.interfaces.steps import segment_files; "
            f"segment_files({str(strip / 'brain.nii.gz')!r}, {str(dest)!r}, model={str(model)!r}, "
            f"mask_file={str(strip / 'brain_mask.nii.gz')!r}, device='cpu', nthreads={threads}, "
            "model_verified=True)")
    start = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True,
                          text=True, check=True)
    wall = time.monotonic() - start
    kib = next(int(line.split(":")[1]) for line in done.stderr.splitlines()
               if "Maximum resident set size" in line)
    return wall, kib * 1024 / GIB


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def table(run: Run) -> list[dict]:
    assert run.mon is not None
    rows = []
    for node in NODES:
        usage = run.mon.nodes.get(node)
        rows.append({
            "field": run.field_strength, "stage": node,
            "wall_s": None if usage is None else round(usage.wall, 1),
            "peak_rss_gib": None if usage is None else round(usage.peak / GIB, 3),
            "sampled_rss_gib": None if usage is None else round(usage.sampled / GIB, 3),
            "processes": 0 if usage is None else len(usage.hwm),
            "declared_mem_gb": DECLARED[node],
        })
    rows.append({"field": run.field_strength, "stage": RUNNER, "wall_s": round(run.seconds, 1),
                 "peak_rss_gib": round(run.mon.runner_hwm / GIB, 3), "sampled_rss_gib": None,
                 "processes": 1, "declared_mem_gb": None})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'field':5} {'stage':18} {'wall s':>8} {'peak RSS GiB':>13} {'sampled GiB':>12} "
          f"{'procs':>5} {'declared mem_gb':>15}")
    for r in rows:
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        peak = "-" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}"
        sampled = "-" if r["sampled_rss_gib"] is None else f"{r['sampled_rss_gib']:.2f}"
        declared = "-" if r["declared_mem_gb"] is None else f"{r['declared_mem_gb']:g}"
        print(f"{r['field']:5} {r['stage']:18} {wall:>8} {peak:>13} {sampled:>12} {r['processes']:>5} "
              f"{declared:>15}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/paper_bench"))
    parser.add_argument("--fields", nargs="+", choices=("3T", "7T"), default=["3T", "7T"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--bg-bias", type=float, default=1.5,
                        help="background logit bias of the random weights (lesions a minority)")
    parser.add_argument("--seed", type=int, default=1, help="phantom seed")
    parser.add_argument("--jobs", type=int, default=1, help="field strengths run at once")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--sloppy", action="store_true", help="pass --sloppy (coarse registration)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--network", choices=("paper", "mid", "tiny"), default="paper",
                        help="benchmarks/inference.py's networks (tiny: a smoke test of this script)")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="phantom size")
    parser.add_argument("--voxel-size", type=float, default=None,
                        help="phantom voxel size in mm instead of the field's (e.g. 0.5: 7T upsampled)")
    parser.add_argument("--isolated-segment", type=int, nargs="+", default=[], metavar="THREADS",
                        help="afterwards, rerun the segment node's function alone under /usr/bin/time -v "
                             "on each run's stripped image, once per thread count")
    parser.add_argument("--no-workflow", action="store_true",
                        help="do not run the workflow: only --isolated-segment on the last run's folders")
    args = parser.parse_args(argv)

    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = make_model(root, args.network, args.folds, bg_bias=args.bg_bias)
    print(f"model: {model} ({args.network} network, {args.folds} folds, random weights, background "
          f"bias {args.bg_bias:g}; {time.perf_counter() - t0:.0f} s)", flush=True)
    plugin_file = root / "plugin.yml"
    plugin_file.write_text("plugin: LegacyMultiProc\n")  # bids_cl adds maxtasksperchild: 1, fork, n_procs
    extra = ["--sloppy"] if args.sloppy else []
    runs = []
    for fs in args.fields:
        t0 = time.perf_counter()
        bids = make_phantom(root, fs, args.seed, args.size, args.voxel_size)
        print(f"phantom {fs}: {bids} ({time.perf_counter() - t0:.0f} s)", flush=True)
        out, work = root / f"run_{fs}" / "out", root / f"run_{fs}" / "work"
        work.parent.mkdir(exist_ok=True)
        runs.append(Run(fs, bids, out, work, root / f"run_{fs}" / "bids_cl.log",
                        participant_command(bids, out, work, model, plugin_file, extra)))

    pending, active, done = ([] if args.no_workflow else list(runs)), [], []
    while pending or active:
        while pending and len(active) < max(1, args.jobs):
            run = pending.pop(0)
            print("$ " + " ".join(run.command), flush=True)
            start(run, args.interval)
            active.append(run)
        time.sleep(1)
        for run in [r for r in active if r.proc is not None and r.proc.poll() is not None]:
            run.exit_code = finish(run)
            active.remove(run)
            done.append(run)
            print(f"{run.field_strength}: exit {run.exit_code} after {run.seconds:.0f} s "
                  f"({run.mon.samples} samples; log {run.log})", flush=True)
            (run.log.parent / "memory.json").write_text(json.dumps(table(run), indent=2))

    rows, checks, ok = [], {}, True
    for run in sorted(done, key=lambda r: args.fields.index(r.field_strength)):
        rows += table(run)
        checks[run.field_strength] = check = check_outputs(run.out, list(DEFAULT_OUTPUT_SPACES))
        check["exit_code"] = run.exit_code
        good = (run.exit_code == 0 and not check["missing"] and check["targets"]
                and all(t["uncertainty_nonzero"] > 0 for t in check["targets"]))
        ok = ok and bool(good)
        for t in check["targets"]:
            print(f"{run.field_strength} {t['prefix']}: {t['lesions']} lesions, uncertainty > 0 for "
                  f"{t['uncertainty_nonzero']} (min/median/max {t['uncertainty']}), template columns "
                  f"{t['template_columns']}, spaces {t['spaces']}, threshold {t['threshold']}, folds "
                  f"{t['folds']}, skull strip {t['skullstrip']}, OOD warning: {t['ood_warning']}")
        print(f"{run.field_strength}: derivatives and report "
              + ("complete" if not check["missing"] else f"MISSING {check['missing']}"), flush=True)
    isolated = []
    for run in runs:
        for threads in args.isolated_segment:
            wall, peak = isolated_segment(run.work, model, threads, run.work.parent / "isolated_segment")
            isolated.append({"field": run.field_strength, "threads": threads, "wall_s": round(wall, 1),
                             "peak_rss_gib": round(peak, 3)})
            print(f"{run.field_strength}: segment_files alone, {threads} thread(s): {wall:.0f} s, "
                  f"peak RSS {peak:.2f} GiB (/usr/bin/time -v)", flush=True)
    if rows:
        print()
        print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "checks": checks, "isolated_segment": isolated,
                                         "commands": {r.field_strength: r.command for r in runs}},
                                        indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
