"""One participant, every stage timed: bids_cl against the chain a user would otherwise run (issue 20).

    python benchmarks/participant.py                               # 3T 1 mm phantom, demo model, CPU
    python benchmarks/participant.py --model paper --field 7T      # paper-sized 5-fold model, 0.75 mm
    python benchmarks/participant.py --field 7T --voxel-size 0.5   # memory at 0.5 mm
    python benchmarks/participant.py --device cuda --repeats 3

On one ``bids_cl-synth --size full`` phantom (MP2RAGE, seed ``--seed``) and in one run:

* **bids_cl**: the whole participant level as a user runs it (``bids_cl BIDS OUT participant --model M
  --nprocs N``, default settings: skull strip ``auto``, all folds, TTA as configured, registration to
  MNI152NLin2009aSym with the default schedule) and, separately, each of its stages in a fresh process:
  ``skullstrip`` (bids_cl.interfaces.steps.skull_strip_files), ``segment`` (segment_files),
  ``register`` (register_files + to_template_files: the transform, the warped maps, template coordinates);
* **stock chain**: the same skull strip, stock ``nnUNetPredictor`` with the same model (all folds, TTA as
  bids_cl configures it for the device), and antspyx's default ``ants.registration(type_of_transform="SyN")``
  of the stripped image to the same template brain, then ``ants.apply_transforms`` of the lesion mask.

Stock and bids_cl stages run interleaved, ``--repeats`` times; medians are reported. Each stage runs in its
own child process so that its **peak RSS** (the child's VmHWM and that of the processes it waited for)
is the stage's own. Agreement: the fraction of voxels where bids_cl's lesion probability and stock's, each
thresholded at the model's threshold inside the brain mask, disagree. Registration times come with CPU
seconds (all threads), which are steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGET_WHOLE_S = 60.0  # issue 20: whole participant, 2 CPU cores, 1 mm, demo model, default settings
TARGET_RATIO = 2.5  # whole participant vs the stock chain
TARGET_REG_RATIO = 3.0  # registration vs antspyx default SyN
TARGET_DISAGREEMENT = 1e-4
SPACE = "MNI152NLin2009aSym"


# --- stages (each runs in a child: python benchmarks/participant.py --stage NAME JOB.json) ------------


def stage_skullstrip(job: dict[str, Any]) -> dict[str, Any]:
    from bids_cl.interfaces.steps import skull_strip_files

    out = skull_strip_files(job["t1w"], job["out"], inv2_file=job.get("inv2"), strategy="auto",
                            is_mp2rage=bool(job.get("inv2")), nthreads=job["threads"])
    return {"files": out, "info": json.loads(Path(out["info"]).read_text())}


def stage_segment(job: dict[str, Any]) -> dict[str, Any]:
    from bids_cl.interfaces.steps import segment_files

    out = segment_files(job["brain"], job["out"], model=job["model"], mask_file=job["mask"],
                        device=job["device"], nthreads=job["threads"])
    return {"files": out, "info": json.loads(Path(out["info"]).read_text())}


def stage_segment_stock(job: dict[str, Any]) -> dict[str, Any]:
    """Stock nnU-Net: nnUNetPredictor on the stripped image, all folds, TTA as bids_cl configures it."""
    import nibabel as nib
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from bids_cl.engine import orientation as orient
    from bids_cl.engine import predictor as pred
    from bids_cl.engine.device import resolve_device
    from bids_cl.engine.models import load_model

    torch.set_num_threads(job["threads"])
    device = resolve_device(job["device"])
    model = load_model(job["model"])
    folds = tuple(int(f) for f in model.available_folds)
    tta = device.type == "cuda"  # bids_cl's default: mirroring on CUDA, off on CPU
    img = nib.load(job["brain"])
    with pred.quiet_stdout():
        p = nnUNetPredictor(device=device, use_mirroring=tta,
                            perform_everything_on_device=device.type == "cuda", allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(model.model_dir), folds)
        # The model's voxel order (bids_cl's orientation step), as a user must do by hand.
        arr = orient.to_nnunet_array(img.get_fdata(dtype=np.float32))
        _, probs = p.predict_single_npy_array(arr, {"spacing": orient.nnunet_spacing(img.header.get_zooms())},
                                              None, None, True)
    lesion = (1.0 - orient.from_nnunet_array(probs[0])).astype(np.float32)
    path = Path(job["out"]) / "stock_probseg.nii.gz"
    nib.save(nib.Nifti1Image(lesion, img.affine), str(path))
    return {"files": {"probseg": str(path)}, "folds": list(folds), "tta": tta}


def stage_register(job: dict[str, Any]) -> dict[str, Any]:
    from bids_cl.interfaces.steps import register_files, to_template_files

    t0 = time.perf_counter()
    reg = register_files(job["brain"], job["out"], space=SPACE, seed=42, nthreads=job["threads"])
    t_reg = time.perf_counter() - t0
    seg = job["segment_files"]
    out = to_template_files(seg["mask"], seg["probseg"], seg["lesions"], reg["info"], job["out"])
    info = json.loads(Path(reg["info"]).read_text())
    return {"files": {**reg, **out}, "metrics": info["result"]["metrics"],
            "seconds_register": round(t_reg, 2)}


def stage_register_stock(job: dict[str, Any]) -> dict[str, Any]:
    """antspyx's default SyN (what a user calls), then the lesion mask to the template (nearest)."""
    import ants
    import nibabel as nib

    from bids_cl.preproc import get_template
    from bids_cl.preproc._ants_worker import _cpu_seconds
    from bids_cl.preproc._images import to_ants

    tpl = get_template(SPACE)
    fixed = ants.image_read(str(tpl.t1w))
    moving = to_ants(nib.load(job["brain"]))
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN",
                            outprefix=str(Path(job["out"]) / "stock_"))
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    mask = to_ants(nib.load(job["segment_files"]["mask"]))
    ants.apply_transforms(fixed=fixed, moving=mask, transformlist=reg["fwdtransforms"],
                          interpolator="nearestNeighbor")
    return {"metrics": {"registration_seconds": round(seconds, 2),
                        "registration_cpu_seconds": round(cpu, 2)}}


def stage_participant(job: dict[str, Any]) -> dict[str, Any]:
    """The whole participant level through the CLI, default settings."""
    from bids_cl.cli.run import main as bids_cl_main

    argv = [job["bids"], job["out"], "participant", "--model", job["model"], "-w", job["work"],
            "--nprocs", str(job["threads"])]
    if job["device"] != "auto":
        argv += ["--device", job["device"]]
    code = bids_cl_main(argv)
    if code != 0:
        raise SystemExit(f"bids_cl participant failed with exit code {code}")
    return {"argv": argv}


STAGES = {f.__name__.removeprefix("stage_"): f for f in (
    stage_skullstrip, stage_segment, stage_segment_stock, stage_register, stage_register_stock,
    stage_participant)}


def run_stage(name: str, job: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one stage in a child process; add its wall time and peak RSS (GB)."""
    job_file = work / f"job_{name}_{time.monotonic_ns()}.json"
    job["result"] = str(job_file.with_suffix(".out.json"))
    job_file.write_text(json.dumps(job))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                    env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--stage", name, str(job_file)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    # wait4, not proc.wait(): its rusage is this child's own (with the processes it waited for).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"stage {name} failed ({code}):\n{output[-3000:]}")
    out = json.loads(Path(job["result"]).read_text())
    out.update(wall_s=round(wall, 2), cpu_s=round(usage.ru_utime + usage.ru_stime, 1))
    return out


def peak_rss_gb() -> float:
    """Peak RSS of this stage process and of the processes it waited for, in GB.

    Not wait4's ru_maxrss in the parent: Linux carries a process's peak across execve, so a child forked
    from this (large) benchmark process would report the benchmark's own RSS. This process's VmHWM
    belongs to its post-exec address space only; its children were forked from it, so theirs are its own.
    """
    import resource

    own_kb = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            own_kb = int(line.split()[1])
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own_kb, children_kb) / 1024 ** 2, 2)


# --- the run -----------------------------------------------------------------------------------------


def make_phantom(root: Path, field: str, voxel_size: float | None, seed: int,
                 size: str = "full") -> tuple[Path, Path, Path | None]:
    from bids_cl.synth import generate_dataset

    bids = root / "bids"
    if not (bids / "dataset_description.json").is_file():
        generate_dataset(bids, participants=1, sessions=1, seed=seed, size=size, field=field,
                         sequence="mp2rage", voxel_size=None if voxel_size is None else (voxel_size,) * 3,
                         lesion_free_fraction=0.0)
    anat = sorted(bids.glob("sub-*/**/anat"))[0]
    uni = sorted(anat.glob("*UNIT1.nii.gz")) or sorted(anat.glob("*T1w.nii.gz"))
    inv2 = sorted(anat.glob("*inv-2*MP2RAGE.nii.gz"))
    return bids, uni[0], inv2[0] if inv2 else None


def work_root(given: str | None, prefix: str) -> Path:
    """The benchmark's work folder (kept and reused when given), with its own TemplateFlow home."""
    root = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(root / "templateflow"))
    return root


def paper_model(root: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inference import make_model  # benchmarks/inference.py: random weights, the paper's plans

    return make_model(root, "paper", folds=5, bg_bias=0.3)


def disagreement(bids_probseg: str, stock_probseg: str, mask: str,
                 threshold: float) -> tuple[float, int, int]:
    import nibabel as nib

    brain = np.asanyarray(nib.load(mask).dataobj) > 0
    a = (nib.load(bids_probseg).get_fdata(dtype=np.float32) > threshold) & brain
    b = (nib.load(stock_probseg).get_fdata(dtype=np.float32) > threshold) & brain
    differ = int((a != b).sum())
    return differ / a.size, differ, int(b.sum())


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--stage":
        job = json.loads(Path(argv[2]).read_text())
        Path(job["out"]).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        out = STAGES[argv[1]](job)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out["peak_rss_gb"] = peak_rss_gb()
        Path(job["result"]).write_text(json.dumps(out))
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, paper (5-fold, random weights) or a path")
    parser.add_argument("--field", choices=["3T", "7T"], default="3T", help="3T: 1 mm, 7T: 0.75 mm")
    parser.add_argument("--voxel-size", type=float, default=None, help="phantom voxel size (e.g. 0.5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all allowed)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions (medians)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="phantom size (tiny: 2 mm, a smoke test of this script)")
    parser.add_argument("--skip-stock-registration", action="store_true",
                        help="leave out antspyx's default SyN (minutes on 2 cores)")
    parser.add_argument("--skip-participant", action="store_true", help="leave out the whole CLI run")
    parser.add_argument("--root", help="work folder (kept; the phantom and models are reused)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    threads = args.threads or len(os.sched_getaffinity(0))
    root = work_root(args.root, "bids_cl_participant.")
    bids, t1w, inv2 = make_phantom(root, args.field, args.voxel_size, args.seed, args.size)
    model = str(paper_model(root)) if args.model == "paper" else args.model
    from bids_cl.engine.models import load_model

    cl_model = load_model(model)
    import nibabel as nib

    shape, zooms = nib.load(str(t1w)).shape, nib.load(str(t1w)).header.get_zooms()
    print(f"phantom {args.field} {shape} {tuple(round(float(z), 2) for z in zooms)} mm ({t1w.name}), "
          f"model {args.model} (folds {list(cl_model.available_folds)}), device {args.device}, "
          f"{threads} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    common = {"threads": threads, "device": args.device, "model": model}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in STAGES}
    for rep in range(args.repeats):
        w = root / f"rep{rep}"
        if w.exists():  # a reused Nipype work folder would serve cached nodes: always start afresh
            shutil.rmtree(w)
        strip = run_stage("skullstrip", {**common, "t1w": str(t1w), "inv2": str(inv2) if inv2 else None,
                                          "out": str(w / "strip")}, root)
        runs["skullstrip"].append(strip)
        brain, mask = strip["files"]["brain"], strip["files"]["mask"]
        seg_job = {**common, "brain": brain, "mask": mask}
        runs["segment_stock"].append(run_stage("segment_stock", {**seg_job, "out": str(w / "stock")}, root))
        seg = run_stage("segment", {**seg_job, "out": str(w / "segment")}, root)
        runs["segment"].append(seg)
        reg_job = {**common, "brain": brain, "segment_files": seg["files"]}
        if not args.skip_stock_registration:
            runs["register_stock"].append(run_stage("register_stock", {**reg_job, "out": str(w / "sreg")},
                                                    root))
        runs["register"].append(run_stage("register", {**reg_job, "out": str(w / "reg")}, root))
        if not args.skip_participant:
            runs["participant"].append(run_stage("participant", {
                **common, "bids": str(bids), "out": str(w / "derivatives"), "work": str(w / "work")}, root))
        print(f"repeat {rep + 1}/{args.repeats} done (load average {os.getloadavg()[0]:.1f})", flush=True)

    threshold = float(runs["segment"][-1]["info"].get("threshold") or 0.5)
    frac, differ, lesion_vox = disagreement(runs["segment"][-1]["files"]["probseg"],
                                            runs["segment_stock"][-1]["files"]["probseg"],
                                            runs["skullstrip"][-1]["files"]["mask"], threshold)
    fig: dict[str, Any] = {"field": args.field, "shape": list(shape), "model": args.model,
                           "device": args.device, "threads": threads, "repeats": args.repeats}
    print(f"\n{'stage':<34}{'wall s (median)':>16}{'CPU s':>9}{'peak RSS GB':>13}")
    rows = [("skull strip (same for both)", "skullstrip"),
            ("segmentation: stock nnUNetPredictor", "segment_stock"), ("segmentation: bids_cl", "segment"),
            ("registration: antspyx SyN (stock)", "register_stock"),
            ("registration+resample: bids_cl", "register"), ("whole participant: bids_cl CLI", "participant")]
    for label, key in rows:
        if not runs[key]:
            continue
        wall = median([r["wall_s"] for r in runs[key]])
        cpu = median([r["cpu_s"] for r in runs[key]])
        rss = max(r["peak_rss_gb"] for r in runs[key])
        fig[key] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": rss,
                    "inner_s": median([r["seconds"] for r in runs[key]])}
        print(f"{label:<34}{wall:>16.1f}{cpu:>9.1f}{rss:>13.2f}")
    for key in ("register", "register_stock"):
        if runs[key]:
            fig[key]["ants_s"] = median([r["metrics"]["registration_seconds"] for r in runs[key]])
            fig[key]["ants_cpu_s"] = median([r["metrics"]["registration_cpu_seconds"] for r in runs[key]])
    stock_chain = fig["skullstrip"]["wall_s"] + fig["segment_stock"]["wall_s"] + (
        fig["register_stock"]["wall_s"] if runs["register_stock"] else float("nan"))
    bids_stages = fig["skullstrip"]["wall_s"] + fig["segment"]["wall_s"] + fig["register"]["wall_s"]
    whole = fig["participant"]["wall_s"] if runs["participant"] else float("nan")
    seg_ratio = fig["segment_stock"]["wall_s"] / fig["segment"]["wall_s"]
    fig.update(stock_chain_s=stock_chain, bids_cl_stages_s=bids_stages, whole_participant_s=whole,
               segment_ratio=seg_ratio, mask_disagreement=frac, differing_voxels=differ,
               stock_lesion_voxels=lesion_vox, threshold=threshold)
    print(f"\nstock chain (strip + nnUNetPredictor + SyN): {stock_chain:.1f} s; bids_cl stages: "
          f"{bids_stages:.1f} s; bids_cl whole participant (CLI): {whole:.1f} s")
    print(f"segmentation: {seg_ratio:.2f}x stock; agreement: {differ} of {int(np.prod(shape))} voxels differ "
          f"({frac:.1e}; stock lesion voxels {lesion_vox}, threshold {threshold:g})")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if runs["register_stock"]:
        r = fig["register_stock"]["ants_s"] / fig["register"]["ants_s"]
        rc = fig["register_stock"]["ants_cpu_s"] / fig["register"]["ants_cpu_s"]
        fig.update(registration_ratio=r, registration_cpu_ratio=rc)
        print(f"registration (in ANTs): stock {fig['register_stock']['ants_s']:.1f} s, bids_cl "
              f"{fig['register']['ants_s']:.1f} s: {r:.2f}x wall, {rc:.2f}x CPU time "
              f"(target >= {TARGET_REG_RATIO}x: {verdict(r >= TARGET_REG_RATIO)})")
        ratio = stock_chain / whole
        fig["whole_ratio"] = ratio
        print(f"whole participant vs stock chain: {ratio:.2f}x (target >= {TARGET_RATIO}x: "
              f"{verdict(ratio >= TARGET_RATIO)})")
        if runs["participant"]:
            # CPU seconds (all threads) are steadier than wall time on a shared machine.
            stock_cpu = sum(fig[k]["cpu_s"] for k in ("skullstrip", "segment_stock", "register_stock"))
            fig["whole_cpu_ratio"] = stock_cpu / fig["participant"]["cpu_s"]
            print(f"whole participant CPU time vs stock chain: stock {stock_cpu:.1f} s, bids_cl "
                  f"{fig['participant']['cpu_s']:.1f} s: {fig['whole_cpu_ratio']:.2f}x")
    print(f"whole participant {whole:.1f} s (target <= {TARGET_WHOLE_S:.0f} s with 2 CPU cores, 1 mm, demo: "
          f"{verdict(whole <= TARGET_WHOLE_S)})")
    print(f"mask disagreement {frac:.1e} (target <= {TARGET_DISAGREEMENT:g}: "
          f"{verdict(frac <= TARGET_DISAGREEMENT)})")
    print(f"segmentation never slower than stock: {verdict(seg_ratio >= 1.0)}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
