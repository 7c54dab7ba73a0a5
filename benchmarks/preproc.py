"""Time and score bids_cl preprocessing at full resolution (not part of the test suite).

    python benchmarks/preproc.py [--strategies deepbet ants none] [--registration] [--nthreads 2]
    python benchmarks/preproc.py --known-warp [--size full] [--schedules fast reference] [--repeats 3]

Skull stripping is scored on Colin27 from Debian ``mricron-data``: ``ch2.nii.gz`` (head with skull) against
``ch2bet.nii.gz`` (its BET brain). The head is first moved by a rigid transform (10 degrees, 15 mm) so
that template-based methods cannot profit from Colin27 already sitting in MNI space. ``inv2`` is scored on
a bids_cl-synth phantom when that generator is available. Registration maps ch2bet to MNI152NLin2009aSym
(1 mm) and reports NCC, mask Dice and the error of a mapped blob centroid.

``--known-warp`` (issue 20) scores registration schedules where the truth is known: a ``bids_cl-synth``
phantom brain (``--size full``: 1 mm) is the template, the subject is that phantom warped by a known smooth
field and rigid motion (``bids_cl.preproc.known_warp``); printed per schedule, interleaved over
``--repeats`` (medians): wall and CPU seconds in ANTs, the error of 2000 mapped brain points and of the
lesion centroids (with the floor the true map itself leaves), and the Dice of the warped tissue maps.
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


def bench_known_warp(size: str, schedules: list[str], repeats: int, nthreads: int, seed: int = 3) -> None:
    import statistics

    from bids_cl.preproc import register_to_template
    from bids_cl.preproc.known_warp import make_case, score_registration
    from bids_cl.synth import SynthOptions, plan_participants, simulate_subject

    options = SynthOptions(participants=1, seed=seed, sequence="mprage", size=size)
    ph = simulate_subject(options, plan_participants(options)[0]).images[0]
    case = make_case(ph.target_image, ph.brain_mask, ph.labels, ph.truth.dseg, ph.affine, seed=1)
    print(f"known warp: bids_cl-synth {size} MPRAGE phantom {ph.target_image.shape} "
          f"{tuple(float(z) for z in np.abs(np.diag(ph.affine))[:3])} mm (seed {seed}) as the template; "
          f"rigid motion + smooth field (|grad| <= {case.warp.max_gradient():.2f}); nthreads={nthreads}, "
          f"{repeats} interleaved repeats (medians); load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: dict[str, list[dict]] = {s: [] for s in schedules}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for schedule in schedules:
                res = register_to_template(case.subject, case.template, template_mask=case.template_mask,
                                           out_prefix=Path(tmp) / f"{schedule}{rep}_", schedule=schedule,
                                           nthreads=nthreads)
                score = score_registration(case, res)
                rows[schedule].append({**res.metrics, **score})
                print(f"  repeat {rep + 1} {schedule}: {res.metrics['registration_seconds']:.1f} s "
                      f"(CPU {res.metrics['registration_cpu_seconds']:.1f} s)", flush=True)

    def med(schedule: str, get) -> float:
        return statistics.median(get(r) for r in rows[schedule])

    print(f"{'schedule':<11}{'wall s':>8}{'CPU s':>8}{'points med/p95 mm':>19}{'lesions med mm':>16}"
          f"{'Dice CSF/GM/WM':>22}")
    for schedule in schedules:
        d = [med(schedule, lambda r, t=t: r["dice"][t]) for t in ("CSF", "GM", "WM")]
        print(f"{schedule:<11}{med(schedule, lambda r: r['registration_seconds']):>8.1f}"
              f"{med(schedule, lambda r: r['registration_cpu_seconds']):>8.1f}"
              f"{med(schedule, lambda r: r['points_mm']['median']):>10.3f} /"
              f"{med(schedule, lambda r: r['points_mm']['p95']):>6.2f}"
              f"{med(schedule, lambda r: r['lesions_mm']['median']):>16.3f}"
              f"{'':>4}{d[0]:.3f}/{d[1]:.3f}/{d[2]:.3f}", flush=True)
    first = rows[schedules[0]][0]
    print(f"identity (no registration) Dice CSF/GM/WM {first['dice_identity']['CSF']:.3f}/"
          f"{first['dice_identity']['GM']:.3f}/{first['dice_identity']['WM']:.3f}; lesion-centroid floor "
          f"(the true map) {first['lesions_floor_mm']['median']:.3f} mm over "
          f"{first['lesions_mm']['n']} lesions")
    if "reference" in rows and len(schedules) > 1:
        for schedule in schedules:
            if schedule != "reference":
                wall = med("reference", lambda r: r["registration_seconds"]) / med(
                    schedule, lambda r: r["registration_seconds"])
                cpu = med("reference", lambda r: r["registration_cpu_seconds"]) / med(
                    schedule, lambda r: r["registration_cpu_seconds"])
                print(f"{schedule} vs reference: {wall:.2f}x wall, {cpu:.2f}x CPU time "
                      f"(target >= 3x: {'met' if min(wall, cpu) >= 3 else 'NOT met'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="*", default=["deepbet", "ants", "none"])
    parser.add_argument("--registration", action="store_true", help="also time registration")
    parser.add_argument("--nthreads", type=int, default=1)
    parser.add_argument("--known-warp", action="store_true",
                        help="only the known-warp accuracy/speed comparison of registration schedules")
    parser.add_argument("--size", choices=["tiny", "full"], default="full", help="known-warp phantom")
    parser.add_argument("--schedules", nargs="*", default=["fast", "reference"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    if args.known_warp:
        bench_known_warp(args.size, args.schedules, args.repeats, args.nthreads)
        return 0
    if not (MRICRON / "ch2.nii.gz").is_file():
        print("needs Debian mricron-data (apt-get install mricron-data)", file=sys.stderr)
        return 66
    bench_skullstrip(args.strategies, args.nthreads)
    if args.registration:
        bench_registration(args.nthreads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
