"""Stock nnU-Net vs the bids_cl fast path: time, speed-up and agreement on the same model and input.

    python benchmarks/inference.py                         # mid-sized net and volume, CPU (a few minutes)
    python benchmarks/inference.py --network paper --volume brain --device cuda --folds 5 --tta
    python benchmarks/inference.py --model /path/to/model  # a real model (e.g. demo), not random weights

Two levels are timed, each as the best of ``--repeats`` interleaved runs (shared machines are noisy):

* ``sliding window``: the part the fast path replaces. Stock =
  ``nnUNetPredictor.predict_logits_from_preprocessed_data`` (all folds), fast = ``FastPredictor`` over the
  same preprocessed tensor, fold by fold (bids_cl keeps every fold's logits for the uncertainty).
* ``end to end``: stock = ``predict_single_npy_array`` (nnU-Net preprocessing + prediction + export);
  fast = ``CLSegmenter.segment`` (the same plus one export per fold, post-processing and the lesion table).

Agreement: final lesion masks (probability > 0.5, restricted to the brain as bids_cl does) of stock and fast,
as the fraction of voxels that differ, and the largest probability difference inside the brain.
Random weights get a background bias so most voxels are confidently background, as with a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bids_cl.engine import CLSegmenter
from bids_cl.engine import orientation as orient
from bids_cl.engine import predictor as pred
from bids_cl.engine import testing as T
from bids_cl.engine.device import resolve_device
from bids_cl.engine.models import load_model

NETWORKS = {
    # name: (features per stage, patch size (nnU-Net axis order z, y, x), pooling per stage or None)
    "tiny": ((4, 8, 16), (32, 32, 32), None),
    "mid": ((16, 32, 64, 128, 256), (64, 64, 64), None),
    # Molchanova et al. plans: PlainConvUNet, 6 stages 32..320, patch 112 x 128 x 160 (1 mm),
    # pooling per axis [4, 5, 5] (the first axis is not pooled at the last stage).
    "paper": ((32, 64, 128, 256, 320, 320), (112, 128, 160),
              ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))),
}
VOLUMES = {
    # name: (grid shape i, j, k at 1 mm, brain ellipsoid radii mm)
    "small": ((72, 80, 70), (30, 35, 28)),
    "mid": ((128, 150, 128), (52, 64, 48)),
    "brain": ((182, 218, 182), (70, 86, 64)),   # MNI-sized 1 mm grid, brain-sized ellipsoid
}


def make_model(root: Path, network: str, folds: int, seed: int = 0, bg_bias: float = 2.0) -> Path:
    """Random-weight model folder (reused when ``root`` already holds it)."""
    folder = root / f"model_{network}_{folds}_bg{bg_bias:g}"
    if (folder / f"fold_{folds - 1}" / "checkpoint_final.pth").is_file():
        return folder
    features, patch, strides = NETWORKS[network]
    plans, dj = T.tiny_plans(features=features, patch=patch, strides=strides), T.tiny_dataset_json()
    weights = {f: T.random_weights(plans, dj, seed=seed + f, bg_bias=bg_bias) for f in range(folds)}
    return T.write_model_folder(folder, plans, dj, weights)


def make_image(volume: str, seed: int = 0) -> nib.Nifti1Image:
    shape, radii = VOLUMES[volume]
    rng = np.random.default_rng(seed)
    blobs = [(tuple(rng.uniform(-0.5, 0.5, 3) * np.array(radii)), float(rng.uniform(1.5, 3)))
             for _ in range(12)]
    img = T.phantom(shape, T.centred_affine(shape), brain_radii=radii, blobs=blobs, noise=30.0, seed=seed)
    return img


def stock_predictor(model_dir: Path, folds: list[int], device: torch.device, tta: bool):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with pred.quiet_stdout():
        p = nnUNetPredictor(device=device, use_mirroring=tta,
                            perform_everything_on_device=device.type == "cuda", allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(model_dir), tuple(folds))
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, cpu_times: list[float] | None = None):
    """Wall-clock seconds of ``fn()`` (and its process CPU time appended to ``cpu_times``).

    CPU time is reported too because shared CPU machines make wall-clock times noisy.
    """
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu)
    return time.perf_counter() - start, out


def peak_rss_of_fast_run(model_dir: Path, image_path: Path, args: argparse.Namespace) -> float:
    """Peak resident memory (GB) of a fresh process that runs one bids_cl segmentation.

    Read as participant.py's ``peak_rss_gb`` (VmHWM), not ru_maxrss: Linux carries ru_maxrss across
    execve, so a child of this benchmark process (large by then) would report the benchmark's own RSS.
    """
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        "from participant import peak_rss_gb; from bids_cl.engine import segment; "
        f"r = segment({str(image_path)!r}, {str(model_dir)!r}, device={args.device!r}, "
        f"tta={args.tta}, nthreads={args.threads}); print(peak_rss_gb())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=sorted(NETWORKS), default="mid")
    parser.add_argument("--volume", choices=sorted(VOLUMES), default="mid")
    parser.add_argument("--model", help="use this model folder/zip/name instead of random weights")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--folds", type=int, default=1, help="folds (random-weight models)")
    parser.add_argument("--tta", action="store_true", help="test-time mirroring (8 variants)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all allowed)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; best time counts")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA only)")
    parser.add_argument("--tile-batch", type=int, default=None, help="fast path batch size")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="fast path precision (default: fp16 autocast on CUDA as stock, fp32 on CPU)")
    parser.add_argument("--end-to-end", action="store_true", help="also time the whole segmentation")
    parser.add_argument("--memory", action="store_true", help="peak RSS of one bids_cl run (subprocess)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--workdir", help="keep (and reuse) the random-weight model here")
    parser.add_argument("--bg-bias", type=float, default=2.0,
                        help="background logit bias of random weights (lower: more lesion voxels)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    threads = args.threads or len(os.sched_getaffinity(0))
    args.threads = threads
    torch.set_num_threads(threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bids_cl_bench."))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else make_model(work, args.network, args.folds,
                                                               bg_bias=args.bg_bias)
    model = load_model(model_dir)
    folds = [int(f) for f in model.available_folds]
    img = make_image(args.volume)
    brain = np.asarray(img.dataobj) != 0
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{threads} threads"
    print(f"device {device} ({where}), "
          f"network {args.model or args.network} {model.provenance['patch_size']}, volume {args.volume} "
          f"{img.shape}, folds {folds}, TTA {args.tta}", flush=True)

    stock = stock_predictor(model.model_dir, folds, device, args.tta)
    fast_seg = CLSegmenter(model, device=device, tta=args.tta, nthreads=threads,
                           compile_network=args.compile, precision=args.precision)
    if args.tile_batch:
        fast_seg.predictor.tile_batch_size = args.tile_batch
    fast = fast_seg.predictor
    arr = orient.to_nnunet_array(img.get_fdata(dtype=np.float32))
    spacing = orient.nnunet_spacing(img.header.get_zooms())
    data, seg, _props = pred.preprocess(fast, arr, spacing)
    fast.tile_mask = torch.from_numpy(seg[0] >= 0)

    results: dict[str, object] = {"device": str(device), "threads": threads,
                                  "network": args.model or args.network, "volume": list(img.shape),
                                  "folds": folds, "tta": args.tta}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
        # warm-up (cuDNN autotuning, compilation) outside the timings; compile time reported separately
        t_warm, _ = timed(lambda: pred.fold_logits(fast, fast_seg.parameters[:1], data), device)
        results["fast_warmup_s"] = round(t_warm, 2)
        with pred.quiet_stdout():
            stock.predict_logits_from_preprocessed_data(data)
    times: dict[str, list[float]] = {"stock": [], "fast": []}
    cpu: dict[str, list[float]] = {"stock": [], "fast": []}
    for _ in range(args.repeats):
        with pred.quiet_stdout():
            t, stock_logits = timed(lambda: stock.predict_logits_from_preprocessed_data(data), device,
                                    cpu["stock"])
        times["stock"].append(t)
        t, fast_logits = timed(lambda: pred.fold_logits(fast, fast_seg.parameters, data), device,
                               cpu["fast"])
        times["fast"].append(t)
    stats = fast.last_stats
    t_stock, t_fast = min(times["stock"]), min(times["fast"])
    c_stock, c_fast = min(cpu["stock"]), min(cpu["fast"])
    mean_fast = torch.stack(fast_logits).mean(0)
    inside = torch.from_numpy(seg[0] >= 0)
    logit_diff = float((mean_fast - stock_logits.float()).abs()[:, inside].max())
    print(f"sliding window: stock {t_stock:.2f} s, fast {t_fast:.2f} s, speed-up {t_stock / t_fast:.2f}x "
          f"(CPU time {c_stock:.1f} s vs {c_fast:.1f} s: {c_stock / c_fast:.2f}x; tiles run "
          f"{stats['tiles_run']}/{stats['tiles']}, mirrors {stats['mirrors']}, precision {fast.precision}; "
          f"max |logit diff| in brain {logit_diff:.2e})", flush=True)
    results.update(window_stock_s=round(t_stock, 3), window_fast_s=round(t_fast, 3),
                   window_speedup=round(t_stock / t_fast, 3), window_cpu_stock_s=round(c_stock, 3),
                   window_cpu_fast_s=round(c_fast, 3), window_cpu_speedup=round(c_stock / c_fast, 3),
                   tiles=stats["tiles"], tiles_run=stats["tiles_run"], max_logit_diff=logit_diff,
                   precision=fast.precision)
    del stock_logits, fast_logits, mean_fast

    # Agreement of the final masks (and optionally end-to-end time).
    e2e = {"stock": [], "fast": []}
    for _ in range(args.repeats if args.end_to_end else 1):
        with pred.quiet_stdout():
            t, (_s, probs) = timed(lambda: stock.predict_single_npy_array(
                arr, {"spacing": spacing}, None, None, True), device)
        e2e["stock"].append(t)
        t, res = timed(lambda: fast_seg.segment(img), device)
        e2e["fast"].append(t)
    p_stock = np.where(brain, orient.from_nnunet_array(probs[1]), 0.0)
    p_fast = res.probability.get_fdata(dtype=np.float32)
    disagreement = float(np.mean((p_fast > 0.5) != (p_stock > 0.5)))
    max_prob_diff = float(np.abs(p_fast - p_stock)[brain].max())
    print(f"agreement: final-mask voxel disagreement {disagreement:.2e} "
          f"({int(np.sum((p_fast > 0.5) != (p_stock > 0.5)))} of {p_fast.size} voxels; "
          f"{int((p_stock > 0.5).sum())} lesion voxels), max |prob diff| in brain {max_prob_diff:.2e}",
          flush=True)
    results.update(mask_disagreement=disagreement, max_prob_diff=max_prob_diff)
    s, f = min(e2e["stock"]), min(e2e["fast"])
    runs = f"best of {len(e2e['stock'])}" if args.end_to_end else "single run"
    print(f"end to end ({runs}): stock {s:.2f} s, bids_cl {f:.2f} s, speed-up {s / f:.2f}x "
          f"(bids_cl also exports {len(folds)} per-fold maps and the lesion table; "
          f"stages {res.summary['Timings']})", flush=True)
    results.update(e2e_stock_s=round(s, 3), e2e_fast_s=round(f, 3), e2e_speedup=round(s / f, 3),
                   e2e_runs=len(e2e["stock"]), fast_stage_timings=res.summary["Timings"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    results["benchmark_peak_rss_gb"] = round(rss, 2)
    if args.memory:
        path = work / "image.nii.gz"
        nib.save(img, path)
        peak = peak_rss_of_fast_run(model.model_dir, path, args)
        print(f"peak RSS of one bids_cl segmentation (fresh process): {peak:.2f} GB", flush=True)
        results["fast_peak_rss_gb"] = round(peak, 2)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
