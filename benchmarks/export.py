"""The engine's export (``predictor.lesion_probability``) against nnU-Net's own, side by side (issue 20).

    python benchmarks/export.py                  # CPU, 1 mm and 0.75 mm brains
    python benchmarks/export.py --device cuda    # logits on the GPU (what the engine keeps there)

Both turn the same random 2-class logits on nnU-Net's preprocessed grid into the lesion probability on
the input grid: nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` (resampling back
in float64 on the CPU, softmax, segmentation, un-cropping of every class) and bids_cl's (the same steps
in torch where the logits are, only the lesion channel comes back). The model is a tiny 1 mm one: the
export does not depend on the network. Printed: seconds per map (best of ``--repeats``), the ratio, and
the largest difference between the two maps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CASES = {"1mm": ((1.0, 1.0, 1.0), (180, 216, 176)), "0.75mm": ((0.75, 0.75, 0.75), (240, 288, 234))}


def best_time(fn, repeats: int, device: torch.device) -> tuple[float, np.ndarray]:
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES, reverse=True))
    args = parser.parse_args(argv)

    from bids_cl.engine import CLSegmenter
    from bids_cl.engine import orientation as orient
    from bids_cl.engine import predictor as pred
    from bids_cl.engine import testing as T

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plans, dj = T.tiny_plans(), T.tiny_dataset_json()
    model = T.write_model_folder(Path(tempfile.mkdtemp(prefix="bids_cl_export.")) / "model", plans, dj,
                                 {0: T.random_weights(plans, dj, seed=1)})
    segmenter = CLSegmenter(model, device=args.device, nthreads=args.threads)
    print(f"device {device}, {args.threads} threads")
    for case in args.cases:
        zooms, shape = CASES[case]
        img = T.phantom(shape, T.centred_affine(shape, zooms), brain_radii=(70, 85, 65))
        array = orient.to_nnunet_array(img.get_fdata(dtype=np.float32))
        data, _seg, props = pred.preprocess(segmenter.predictor, array, orient.nnunet_spacing(zooms))
        logits = torch.randn((2, *data.shape[1:]), generator=torch.Generator().manual_seed(0)).to(device)
        stock_s, stock = best_time(
            lambda lg=logits, pr=props: pred.export_probabilities(segmenter.predictor, lg, pr, args.threads),
            args.repeats, device)
        ours_s, ours = best_time(
            lambda lg=logits, pr=props: pred.lesion_probability(segmenter.predictor, lg, pr, args.threads),
            args.repeats, device)
        mode = pred.export_resampling(segmenter.predictor, props, tuple(logits.shape))
        print(f"{case:>7} input {shape}, preprocessed {tuple(data.shape[1:])}, resampling {mode}: nnU-Net "
              f"{stock_s:.3f} s, bids_cl {ours_s:.3f} s per map: {stock_s / ours_s:.1f}x; "
              f"max |difference| {float(np.abs(ours - stock).max()):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
