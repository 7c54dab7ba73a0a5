"""Time the lesion-wise + voxel-wise metrics on a 7T-size and a 1 mm synthetic case.

Run: ``python benchmarks/metrics.py [--repeats 3] [--seed 0]``. Each case has a GT with hundreds of
small blob lesions and a prediction made from it by shifting, growing, dropping and splitting some
lesions and adding false positives, so every verdict kind occurs. Prints the best wall time of
`evaluate_masks` (both labellings, matching, voxel counts) and of its stages.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from bids_cl.evaluation.metrics import match_lesions, voxel_counts
from bids_cl.utils.components import label_components

CASES = {
    # name: (shape, voxel size mm, number of GT lesions)
    "7T 0.5 mm whole brain": ((320, 440, 360), 0.5, 600),
    "3T 1 mm whole brain": ((176, 256, 256), 1.0, 200),
}


def make_case(
    shape: tuple[int, int, int], n_lesions: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A GT with `n_lesions` ellipsoid-ish blobs and a perturbed prediction (both bool)."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    margin = 12
    centres = rng.integers(margin, np.array(shape) - margin, size=(n_lesions, 3))
    radii = rng.uniform(1.2, 5.0, size=(n_lesions, 3))
    ball = np.mgrid[-8:9, -8:9, -8:9]
    for centre, radius in zip(centres, radii, strict=True):
        blob = ((ball / radius[:, None, None, None]) ** 2).sum(0) <= 1.0
        box = tuple(slice(c - 8, c + 9) for c in centre)
        gt[box] |= blob
        fate = rng.random()
        if fate < 0.15:  # missed
            continue
        if fate < 0.25:  # under-segmented: a small piece only
            piece = blob & (ball[0] > radius[0] * 0.5)
            pred[box] |= piece
            continue
        shifted = np.roll(blob, tuple(rng.integers(-1, 2, size=3)), axis=(0, 1, 2))
        if fate < 0.40:
            shifted = ndimage.binary_dilation(shifted)
        if fate > 0.90:  # split in two by a cut plane
            shifted &= ball[1] != 0
        pred[box] |= shifted
    fp_centres = rng.integers(margin, np.array(shape) - margin, size=(n_lesions // 5, 3))
    for centre in fp_centres:
        pred[tuple(slice(c - 1, c + 2) for c in centre)] = True
    return pred, gt


def best_time(func: Callable[[], object], repeats: int) -> float:
    """Best wall time (s) over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, (shape, voxel_mm, n_lesions) in CASES.items():
        pred, gt = make_case(shape, n_lesions, args.seed)
        pred_labels, n_pred = label_components(pred)
        gt_labels, n_gt = label_components(gt)
        match = match_lesions(pred_labels, n_pred, gt_labels, n_gt)
        counts = match.counts

        def run_all(pred: np.ndarray = pred, gt: np.ndarray = gt) -> None:
            p_labels, p_n = label_components(pred)
            g_labels, g_n = label_components(gt)
            match_lesions(p_labels, p_n, g_labels, g_n)
            voxel_counts(pred, gt)

        t_label = best_time(lambda pred=pred: label_components(pred), args.repeats)
        t_match = best_time(
            lambda a=pred_labels, b=gt_labels, na=n_pred, nb=n_gt: match_lesions(a, na, b, nb),
            args.repeats,
        )
        t_voxel = best_time(lambda a=pred, b=gt: voxel_counts(a, b), args.repeats)
        t_total = best_time(run_all, args.repeats)
        print(
            f"{name}: {'x'.join(map(str, shape))} voxels ({voxel_mm} mm), "
            f"{n_gt} GT / {n_pred} predicted lesions "
            f"(TP {counts.tp}, FP {counts.fp}, USL {counts.usl}, FN {counts.fn})\n"
            f"  total {t_total:.2f} s = 2 x label {t_label:.2f} s + match {t_match:.2f} s"
            f" + voxel counts {t_voxel:.2f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
