"""antspyx work that runs in a fresh Python process (``python -m bids_cl.preproc._ants_worker job.json``).

Why a separate process: ITK fixes its thread count the first time any ITK filter runs in a process, so
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` set later (e.g. inside a reused Nipype worker) is ignored, and
ANTs registration is bit-for-bit reproducible only with one thread and a fixed seed (measured on Colin27
at 2 mm: two 2-thread runs with the same seed differ by up to 18 of 255 intensity units in the warped
image; two 1-thread runs are identical). A fresh process with the variable in its environment gets both right.
The parent talks to the child only through files (NIfTI in, transforms + a result JSON out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bids_cl.errors import EXIT_FAILURE, BidsClError

SLOPPY_MM = 4.0  # working resolution of sloppy (test) registrations

#: Registration schedules of ``task_register`` (``register_to_template(schedule=...)``).
#:
#: * ``fast`` (default): both images resampled (linear) to ``work_mm`` = 2 mm when finer, then antspyx
#:   ``SyN`` with SyN iterations (40, 20) at 4 and 2 mm, single precision. The template space serves
#:   group frequency maps and template coordinates, not the segmentation, and ``reference``'s finest SyN
#:   level with iterations is 2 mm already (its 1 mm level runs 0 iterations but still builds the 1 mm
#:   pyramid and fields); the affine's levels become 8/4/4 mm instead of 4/2/2 mm. Both images are
#:   cropped to their non-zero box plus ``crop_mm`` = 6 mm (about half of a template's grid is empty),
#:   which shrinks SyN's domain (the fixed grid) and so its cost; the field is zero outside it, where
#:   both brains are empty.
#: * ``reference``: the schedule before issue 20, antspyx ``SyN`` as shipped (affine 2100x1200x1200x0 at
#:   shrink 4/2/2/1, SyN 40x20x0 at shrink 4/2/1) on the native grids; the stock chain of the benchmark.
#: * ``sloppy``: 4 mm, ``antsRegistrationSyNQuick[s]``: seconds, for tests.
SCHEDULES: dict[str, dict[str, Any]] = {
    "fast": {"work_mm": 2.0, "crop_mm": 6.0, "type_of_transform": "SyN", "reg_iterations": (40, 20)},
    "reference": {"work_mm": None, "crop_mm": None, "type_of_transform": "SyN",
                  "reg_iterations": (40, 20, 0)},
    # SyNQuick[s] (rigid + affine + SyN, coarse levels only) takes ~3 s at 4 mm where "SyN" with
    # (20, 10) iterations takes ~13 s (measured on 2 loaded cores).
    "sloppy": {"work_mm": SLOPPY_MM, "crop_mm": None, "type_of_transform": "antsRegistrationSyNQuick[s]"},
}
DEFAULT_SCHEDULE = "fast"


def run_isolated(task: str, params: dict[str, Any], *, nthreads: int = 1,
                 timeout: float | None = None) -> dict[str, Any]:
    """Run ``TASKS[task](**params)`` in a child Python with ITK limited to ``nthreads`` threads."""
    with tempfile.TemporaryDirectory(prefix="bids_cl_ants_") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"task": task, "params": params, "result": str(result)}))
        env = dict(os.environ)
        threads = str(max(1, int(nthreads)))
        # The child must import this very bids_cl, also when it is not installed (e.g. a source tree).
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env.update({
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            "NIPYPE_NO_ET": "1",
        })
        proc = subprocess.run(
            [sys.executable, "-m", "bids_cl.preproc._ants_worker", str(job)],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise BidsClError(f"antspyx {task} failed (exit {proc.returncode}): " + " | ".join(tail),
                              EXIT_FAILURE)
        return json.loads(result.read_text())


# --- tasks (run in the child) --------------------------------------------------------------------------


def _read(path: str, dtype: str = "float32"):  # -> ants.ANTsImage
    """Read a NIfTI with nibabel and convert ourselves (one conversion path for the whole package)."""
    import nibabel as nib

    from bids_cl.preproc._images import to_ants

    return to_ants(nib.load(path), dtype=np.dtype(dtype))


def _set_seed(seed: int | None) -> None:
    import ants

    # antspyx 0.6 reads the seed from ants.config (it passes --random-seed to antsRegistration);
    # older releases took a random_seed argument instead, handled in _registration().
    if hasattr(ants, "config"):
        ants.config._random_seed = seed


def _registration(fixed, moving, **kwargs):  # -> dict
    import inspect

    import ants

    seed = kwargs.pop("seed", None)
    if "random_seed" in inspect.signature(ants.registration).parameters:
        kwargs["random_seed"] = seed
    else:
        _set_seed(seed)
    return ants.registration(fixed, moving, **kwargs)


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _crop_to_content(img, margin_mm: float | None):  # -> ants.ANTsImage
    """``img`` cropped to the box of its non-zero voxels plus ``margin_mm``, in the same physical space."""
    import ants

    data = img.numpy()
    nz = np.argwhere(data != 0)
    if margin_mm is None or nz.size == 0:
        return img
    pad = np.ceil(margin_mm / np.asarray(img.spacing)).astype(int)
    lo = np.maximum(nz.min(0) - pad, 0)
    hi = np.minimum(nz.max(0) + pad + 1, data.shape)
    if np.all(lo == 0) and np.all(hi == data.shape):
        return img
    direction = np.asarray(img.direction)
    origin = np.asarray(img.origin) + direction @ (np.asarray(img.spacing) * lo)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    return ants.from_numpy(np.ascontiguousarray(data[box]), origin=tuple(origin), spacing=img.spacing,
                           direction=direction)


def _at_least(img, work_mm: float | None):  # -> ants.ANTsImage
    """``img`` resampled (linear) to ``work_mm`` isotropic when any voxel side is finer, else itself."""
    import ants

    if work_mm is None or min(img.spacing) >= work_mm - 1e-6:
        return img
    return ants.resample_image(img, (work_mm,) * 3, use_voxels=False, interp_type=0)


def task_register(*, fixed: str, moving: str, fixed_mask: str | None, out_prefix: str, seed: int,
                  sloppy: bool = False, schedule: str | None = None) -> dict[str, Any]:
    """Affine + SyN of ``moving`` (subject brain) to ``fixed`` (template brain); ANTs composite .h5 out.

    ``schedule`` names an entry of ``SCHEDULES`` (default ``fast``; ``sloppy=True`` means ``sloppy``).
    Transforms live in world space, so those computed on resampled images apply to the full-resolution
    images (the composite's displacement field is stored on the working grid).
    """
    import ants

    from bids_cl.preproc._images import dice

    name = schedule or ("sloppy" if sloppy else DEFAULT_SCHEDULE)
    if name not in SCHEDULES:
        raise ValueError(f"unknown registration schedule {name!r}; one of {sorted(SCHEDULES)}")
    plan = dict(SCHEDULES[name])
    work_mm, crop_mm = plan.pop("work_mm"), plan.pop("crop_mm")
    t0, cpu0 = time.time(), _cpu_seconds()
    fixed_img, moving_img = _read(fixed), _read(moving)
    mask_img = _read(fixed_mask) if fixed_mask else None
    if mask_img is not None:
        # The template may be a head (TemplateFlow spaces without desc-brain T1w): register brain to brain.
        fixed_img = fixed_img.new_image_like(fixed_img.numpy() * (mask_img.numpy() > 0.5))
    fix = _crop_to_content(_at_least(fixed_img, work_mm), crop_mm)
    mov = _crop_to_content(_at_least(moving_img, work_mm), crop_mm)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    reg = _registration(fix, mov, outprefix=out_prefix, write_composite_transform=True, seed=seed,
                        **plan)
    t_reg, cpu_reg = time.time() - t0, _cpu_seconds() - cpu0
    fwd, inv = reg["fwdtransforms"], reg["invtransforms"]
    fwd = [fwd] if isinstance(fwd, str) else list(fwd)
    inv = [inv] if isinstance(inv, str) else list(inv)

    # Metrics on the template's own grid at full resolution.
    warped = ants.apply_transforms(fixed_img, moving_img, fwd, interpolator="linear")
    identity = ants.resample_image_to_target(moving_img, fixed_img, interp_type="linear")
    ref = (mask_img.numpy() > 0.5) if mask_img is not None else (fixed_img.numpy() != 0)
    fixed_np = fixed_img.numpy()
    warped_path = f"{out_prefix}Warped.nii.gz"
    _write_like(warped, fixed, warped_path)
    return {
        "forward_transforms": fwd,
        "inverse_transforms": inv,
        "warped_moving": warped_path,
        "metrics": {
            "ncc_before": _ncc(fixed_np, identity.numpy(), ref),
            "ncc_after": _ncc(fixed_np, warped.numpy(), ref),
            "mask_dice": dice(warped.numpy() != 0, ref),
            "registration_seconds": round(t_reg, 2),
            "registration_cpu_seconds": round(cpu_reg, 2),  # all threads; steadier than wall on busy nodes
            "sloppy": name == "sloppy",
            "schedule": name,
            "work_mm": work_mm,
            "seed": seed,
            "itk_threads": int(os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "0")),
        },
    }


def _write_like(aimg, reference_path: str, out_path: str) -> None:
    """Save an antspyx image on ``reference_path``'s grid with that file's header (sform codes etc.)."""
    import nibabel as nib

    from bids_cl.preproc._images import like
    from bids_cl.utils.io import atomic_save_nifti

    ref = nib.load(reference_path)
    atomic_save_nifti(like(ref, aimg.numpy(), np.float32), Path(out_path))


def task_brain_mask(*, head: str, template: str, template_mask: str, out_mask: str, seed: int,
                    work_mm: float = 2.0, syn: bool = True) -> dict[str, Any]:
    """Template-based brain extraction: warp a template brain mask onto a head image.

    Steps (all at ``work_mm``): rough head mask by thresholding (ants.get_mask) -> N4 bias correction
    inside it -> affine of the template *brain* to the N4-corrected head (Mattes MI tolerates the skull
    the template lacks) -> SyN restricted to the affinely placed mask dilated by 8 mm, so scalp and neck
    mostly stay out of the metric -> warp the template mask to the full-resolution head grid.
    """
    import ants
    from scipy import ndimage

    stages: dict[str, float] = {}
    t = time.time()
    head_full = _read(head)
    tpl, tpl_mask = _read(template), _read(template_mask)
    hd = ants.resample_image(head_full, (work_mm,) * 3, use_voxels=False, interp_type=0)
    tpl = ants.resample_image(tpl, (work_mm,) * 3, use_voxels=False, interp_type=0)
    tpl_mask_w = ants.resample_image(tpl_mask, (work_mm,) * 3, use_voxels=False, interp_type=1)
    head_mask = ants.get_mask(hd)
    # Shrink 4 at 2 mm = 8 mm bias grid: bias fields are smooth and this keeps N4 at seconds (shrink 2
    # took 20-70 s on our 2-core machines).
    n4 = ants.n4_bias_field_correction(hd, mask=head_mask, shrink_factor=4,
                                       convergence={"iters": [50, 50, 50], "tol": 1e-6})
    n4 = n4 * head_mask
    stages["n4"] = time.time() - t

    t = time.time()
    with tempfile.TemporaryDirectory(prefix="bids_cl_bet_") as tmp:
        aff = _registration(n4, tpl, type_of_transform="Affine", outprefix=f"{tmp}/aff_", seed=seed)
        transforms = aff["fwdtransforms"]
        stages["affine"] = time.time() - t
        if syn:
            t = time.time()
            placed = ants.apply_transforms(n4, tpl_mask_w, transforms, interpolator="nearestNeighbor")
            vox = max(1, round(8.0 / work_mm))
            region = ndimage.binary_dilation(placed.numpy() > 0.5, iterations=vox).astype(np.float32)
            region_img = ants.from_numpy(region, origin=placed.origin, spacing=placed.spacing,
                                         direction=placed.direction)
            syn_reg = _registration(n4, tpl, type_of_transform="SyNOnly", initial_transform=transforms[0],
                                    mask=region_img, reg_iterations=(30, 10, 0), syn_metric="mattes",
                                    outprefix=f"{tmp}/syn_", seed=seed)
            transforms = syn_reg["fwdtransforms"]
            stages["syn"] = time.time() - t
        warped = ants.apply_transforms(head_full, tpl_mask, transforms, interpolator="linear")
    _write_like(warped, head, out_mask)
    return {"stages": {k: round(v, 2) for k, v in stages.items()}, "work_mm": work_mm}


def task_rigid(*, fixed: str, moving: str, out_prefix: str, seed: int, work_mm: float) -> dict[str, Any]:
    """Rigid (6 dof) registration of ``moving`` to ``fixed`` (two sessions of one participant).

    Images finer than ``work_mm`` are registered resampled to it (a rigid transform needs no more: at
    2 mm it matches the 1 mm estimate within 0.01 mm on a full-size phantom, in 14 s instead of 200 s).
    Returns the ITK transform's parameters (LPS; it maps *fixed* points to *moving* points): a 3x3
    matrix (row-major), a translation and the centre of rotation. Used by bids_cl.longitudinal.align.
    """
    import ants

    images = []
    for img in (_read(fixed), _read(moving)):
        if min(img.spacing) < work_mm:
            img = ants.resample_image(img, (work_mm,) * 3, use_voxels=False, interp_type=0)
        images.append(img)
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    reg = _registration(images[0], images[1], type_of_transform="Rigid", outprefix=out_prefix, seed=seed)
    fwd = reg["fwdtransforms"]
    transform = ants.read_transform(fwd if isinstance(fwd, str) else fwd[0])
    return {"parameters": [float(v) for v in transform.parameters],
            "fixed_parameters": [float(v) for v in transform.fixed_parameters],
            "transform_type": str(transform.transform_type)}


TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "register": task_register,
    "brain_mask": task_brain_mask,
    "rigid": task_rigid,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    out = TASKS[job["task"]](**job["params"])
    Path(job["result"]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
