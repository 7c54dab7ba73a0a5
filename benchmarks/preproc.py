"""Time and score bids_cl preprocessing at full resolution (not part of the test suite).

    python benchmarks/preproc.py [--strategies deepbet ants none] [--registration] [--nthreads 2]

Skull stripping is scored on Colin27 from Debian ``mricron-data``: ``ch2.nii.gz`` (head with skull) against
``ch2bet.nii.gz`` (its BET brain). The head is first moved by a rigid transform (10 degrees, 15 mm) so
that template-based methods cannot profit from Colin27 already sitting in MNI space. ``inv2`` is scored on
a bids_cl-synth phantom when that generator is available. Registration maps ch2bet to MNI152NLin2009aSym
(1 mm) and reports NCC, mask Dice and the error of a mapped blob centroid.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

MRICRON = Path("/usr/share/mricron/templates")


def moved_colin(path: Path) -> nib.Nifti1Image:
    """Colin27 with its affine composed with a rigid motion: same voxels, so ch2bet still applies."""
    img = nib.load(str(path))
    angle = np.deg2rad(10.0)
    rigid = np.eye(4)
    rigid[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    rigid[:3, 3] = [5.0, -12.0, 8.0]
    return nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), rigid @ img.affine)


def bench_skullstrip(strategies: list[str], nthreads: int) -> None:
    from bids_cl.preproc import skull_strip
    from bids_cl.preproc._images import dice

    head = moved_colin(MRICRON / "ch2.nii.gz")
    ref = np.asanyarray(nib.load(str(MRICRON / "ch2bet.nii.gz")).dataobj) > 0
    t0 = time.perf_counter()
    from bids_cl.preproc.skullstrip import deepbet_mask

    deepbet_mask(head, nthreads=nthreads)  # warm-up: importing torch and loading deepbet's models
    print(f"deepbet first call (imports torch, loads the models): {time.perf_counter() - t0:.1f} s")
    print(f"skull stripping, Colin27 181x217x181 1 mm, nthreads={nthreads} (deepbet timed warm)")
    print(f"{'strategy':<12}{'dice':>8}{'seconds':>10}  detail")
    for strategy in strategies:
        img = nib.Nifti1Image(np.asanyarray(nib.load(str(MRICRON / "ch2bet.nii.gz")).dataobj)
                              .astype(np.float32), head.affine) if strategy == "none" else head
        t0 = time.perf_counter()
        res = skull_strip(img, strategy=strategy, nthreads=nthreads)
        seconds = time.perf_counter() - t0
        score = 1.0 if strategy == "none" else dice(np.asanyarray(res.mask.dataobj), ref)
        print(f"{strategy:<12}{score:>8.3f}{seconds:>10.1f}  {res.detail}", flush=True)
    bench_inv2_phantom(nthreads)


def bench_inv2_phantom(nthreads: int, size: str = "full") -> None:
    """MP2RAGE phantom (bids_cl-synth): mask from INV2 vs deepbet on the noisy UNI, vs the true mask."""
    try:
        from bids_cl.synth import SynthOptions, plan_participants, simulate_subject
    except ImportError:
        print("inv2: bids_cl.synth not available; skipped")
        return
    from bids_cl.preproc import skull_strip
    from bids_cl.preproc._images import dice

    options = SynthOptions(participants=1, seed=3, sequence="mp2rage", size=size)
    phantom = simulate_subject(options, plan_participants(options)[0]).images[0]
    uni = nib.Nifti1Image(phantom.images[phantom.target], phantom.affine)
    inv2_stem = next(k for k in phantom.images if "inv-2" in k)
    inv2 = nib.Nifti1Image(phantom.images[inv2_stem], phantom.affine)
    print(f"MP2RAGE phantom ({size}, {uni.shape}, seed 3) against its true brain mask")
    for strategy, kwargs in (("inv2", {"inv2_img": inv2}), ("deepbet", {"is_mp2rage": True})):
        t0 = time.perf_counter()
        res = skull_strip(uni, strategy=strategy, nthreads=nthreads, **kwargs)
        seconds = time.perf_counter() - t0
        score = dice(np.asanyarray(res.mask.dataobj), phantom.brain_mask)
        print(f"{strategy:<12}{score:>8.3f}{seconds:>10.1f}  {res.detail}", flush=True)


def bench_registration(nthreads: int) -> None:
    from bids_cl.preproc import apply_to_template, get_template, points_to_template, register_to_template

    brain = nib.load(str(MRICRON / "ch2bet.nii.gz"))
    brain = nib.Nifti1Image(np.asanyarray(brain.dataobj).astype(np.float32), brain.affine)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TEMPLATEFLOW_HOME", str(Path(tmp) / "tf"))
        for sloppy in (True, False):
            tpl = get_template("MNI152NLin2009aSym", resolution=1)
            t0 = time.perf_counter()
            res = register_to_template(brain, tpl, out_prefix=Path(tmp) / f"s{int(sloppy)}_",
                                       nthreads=nthreads, sloppy=sloppy)
            seconds = time.perf_counter() - t0
            err = blob_error(brain, res, tpl, apply_to_template, points_to_template)
            m = res.metrics
            print(f"registration sloppy={sloppy}: {seconds:.1f} s total ({m['registration_seconds']} s "
                  f"in ANTs), NCC {m['ncc_before']:.3f} -> {m['ncc_after']:.3f}, mask Dice "
                  f"{m['mask_dice']:.3f}, blob centroid error {err:.2f} mm", flush=True)


def blob_error(brain, res, tpl, apply_to_template, points_to_template) -> float:
    """Distance between a mapped centroid and the centroid of the warped blob (template mm)."""
    shape = brain.shape
    ii, jj, kk = np.indices(shape)
    center = np.array(shape) // 2 + np.array([20, 10, 15])
    blob = ((ii - center[0]) ** 2 + (jj - center[1]) ** 2 + (kk - center[2]) ** 2) <= 5**2
    blob_img = nib.Nifti1Image(blob.astype(np.uint8), brain.affine)
    centroid = nib.affines.apply_affine(brain.affine, np.argwhere(blob).mean(0))
    mapped = points_to_template(centroid[None], res)[0]
    warped = apply_to_template(blob_img, res, tpl, interpolation="linear")
    w = warped.get_fdata()
    idx = np.argwhere(w > 0)
    warped_centroid = nib.affines.apply_affine(warped.affine, (idx * w[w > 0][:, None]).sum(0) / w.sum())
    return float(np.linalg.norm(mapped - warped_centroid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="*", default=["deepbet", "ants", "none"])
    parser.add_argument("--registration", action="store_true", help="also time registration")
    parser.add_argument("--nthreads", type=int, default=1)
    args = parser.parse_args(argv)
    if not (MRICRON / "ch2.nii.gz").is_file():
        print("needs Debian mricron-data (apt-get install mricron-data)", file=sys.stderr)
        return 66
    bench_skullstrip(args.strategies, args.nthreads)
    if args.registration:
        bench_registration(args.nthreads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
