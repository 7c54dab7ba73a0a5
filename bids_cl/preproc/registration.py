"""Registration of a skull-stripped T1w to a template with antspyx (affine + SyN), and its use.

Conventions (ANTs): ``forward_transforms`` resample a *subject* image onto the *template* grid
(``apply_to_template``); the same transform maps template *points* to subject points, so subject points go
to the template with the *inverse* transforms (``points_to_template``). ANTs works in LPS millimetres;
nibabel and our lesion tables use RAS ("scanner") millimetres: x and y change sign between the two.

The transforms are written as ANTs composite HDF5 files (``<out_prefix>Composite.h5`` and
``<out_prefix>InverseComposite.h5``): the first is the ``_from-T1w_to-<tpl>_mode-image_xfm.h5`` derivative.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bids_cl.errors import EXIT_BAD_DATA, BidsClError
from bids_cl.preproc._ants_worker import DEFAULT_SCHEDULE, SCHEDULES, run_isolated
from bids_cl.preproc._images import RAS_TO_LPS, load_3d, to_ants
from bids_cl.preproc.templates import TemplateFiles

DEFAULT_SEED = 42
INTERPOLATIONS = ("nearestNeighbor", "linear", "genericLabel")


@dataclass
class RegistrationResult:
    """Paths to the transforms and the warped subject image; serialisable (plain strings and numbers)."""

    forward_transforms: list[str]  # subject image -> template grid (== [composite_h5])
    inverse_transforms: list[str]  # template image -> subject grid; subject points -> template points
    composite_h5: str  # the _from-T1w_to-<tpl>_mode-image_xfm.h5 derivative
    warped_moving: str  # the subject brain resampled on the template grid (float32 NIfTI)
    metrics: dict[str, Any] = field(default_factory=dict)
    template: str = ""  # the fixed image file the transforms were computed against ("" if in memory)

    @property
    def inverse_composite_h5(self) -> str:
        return self.inverse_transforms[0]


def _as_file(img: Any, path: Path) -> str:
    """A path for the child process: existing files are passed through, in-memory images are saved."""
    if isinstance(img, (str, os.PathLike)):
        return str(Path(img).absolute())
    nib.save(load_3d(img), str(path))
    return str(path)


def _template_paths(template: Any, template_mask: Any) -> tuple[Any, Any]:
    if isinstance(template, TemplateFiles):
        return template.t1w, template_mask if template_mask is not None else template.mask
    return template, template_mask


def register_to_template(
    moving_brain: Any,
    template: TemplateFiles | nib.Nifti1Image | str | os.PathLike[str],
    *,
    template_mask: nib.Nifti1Image | str | os.PathLike[str] | None = None,
    seed: int = DEFAULT_SEED,
    nthreads: int = 1,
    out_prefix: str | os.PathLike[str],
    sloppy: bool = False,
    schedule: str | None = None,
) -> RegistrationResult:
    """Register a skull-stripped subject T1w (moving) to a template brain (fixed): affine + SyN.

    ``template`` is a ``TemplateFiles`` (its mask is used when ``template_mask`` is None) or a T1w image;
    a head template is multiplied by its mask first. The run is deterministic for a given ``seed`` when
    ``nthreads == 1`` (ITK sums in thread order otherwise). It runs in a child process so that
    ``nthreads`` is honoured (see ``_ants_worker``). ``schedule`` (``_ants_worker.SCHEDULES``): ``fast``
    (default; affine + SyN at 2 mm), ``reference`` (antspyx ``SyN`` as shipped, at the native grids: the
    schedule before issue 20) or ``sloppy`` (4 mm, few iterations: seconds, for tests; what ``sloppy=True``
    asks for). Outputs go to ``<out_prefix>Composite.h5``, ``<out_prefix>InverseComposite.h5``
    and ``<out_prefix>Warped.nii.gz``.
    """
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, not {schedule!r}")
    if sloppy and schedule not in (None, "sloppy"):
        raise ValueError(f"sloppy=True contradicts schedule={schedule!r}")
    prefix = Path(out_prefix).absolute()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tpl, tpl_mask = _template_paths(template, template_mask)
    moving = load_3d(moving_brain, "moving image")
    data = np.asanyarray(moving.dataobj)
    if not np.isfinite(data).all() or not np.any(data):
        raise BidsClError("cannot register: the skull-stripped image is empty or has NaN/inf values",
                          EXIT_BAD_DATA)
    with tempfile.TemporaryDirectory(prefix="bids_cl_reg_") as tmp:
        params = {
            "fixed": _as_file(tpl, Path(tmp, "fixed.nii.gz")),
            "moving": _as_file(moving_brain, Path(tmp, "moving.nii.gz")),
            "fixed_mask": None if tpl_mask is None else _as_file(tpl_mask, Path(tmp, "mask.nii.gz")),
            "out_prefix": str(prefix),
            "seed": int(seed),
            "sloppy": bool(sloppy),
            "schedule": schedule or ("sloppy" if sloppy else DEFAULT_SCHEDULE),
        }
        out = run_isolated("register", params, nthreads=nthreads)
        template_ref = params["fixed"] if isinstance(tpl, (str, os.PathLike)) else ""
    return RegistrationResult(
        forward_transforms=out["forward_transforms"],
        inverse_transforms=out["inverse_transforms"],
        composite_h5=out["forward_transforms"][0],
        warped_moving=out["warped_moving"],
        metrics=out["metrics"],
        template=template_ref,
    )


def apply_to_template(
    img: Any,
    result: RegistrationResult,
    template: TemplateFiles | nib.Nifti1Image | str | os.PathLike[str] | None = None,
    interpolation: str = "nearestNeighbor",
) -> nib.Nifti1Image:
    """Resample a subject-space image (mask, probability map) onto the template grid.

    ``nearestNeighbor``/``genericLabel`` keep the input's data type (use them for masks and label maps);
    ``linear`` returns float32 (probability maps). Resampling is deterministic at any thread count.
    """
    import ants

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
    tpl = template.t1w if isinstance(template, TemplateFiles) else template
    tpl_img = load_3d(tpl if tpl is not None else result.template, "template")
    src = load_3d(img, "image")
    out = ants.apply_transforms(
        fixed=to_ants(tpl_img), moving=to_ants(src, dtype=np.float32),
        transformlist=list(result.forward_transforms), interpolator=interpolation,
    )
    slope, inter = src.header.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    # Labels keep their integer type; scaled integers (scl_slope) and linear results become float32.
    dtype = np.float32 if interpolation == "linear" or scaled else src.get_data_dtype()
    warped = out.numpy()
    if np.issubdtype(dtype, np.integer):
        warped = np.rint(warped)
    res = nib.Nifti1Image(warped.astype(dtype), tpl_img.affine, tpl_img.header.copy())
    res.header.set_data_dtype(dtype)
    res.header.set_slope_inter(None, None)
    return res


def points_to_template(xyz_mm: np.ndarray, result: RegistrationResult) -> np.ndarray:
    """Map (N, 3) subject scanner (RAS mm) coordinates, e.g. lesion centroids, to template RAS mm."""
    import ants
    import pandas as pd

    pts = np.asarray(xyz_mm, dtype=np.float64).reshape(-1, 3)
    if pts.shape[0] == 0:
        return np.zeros((0, 3))
    lps = pts * np.diag(RAS_TO_LPS)[:3]
    frame = pd.DataFrame(lps, columns=["x", "y", "z"])
    # Points travel opposite to images: the inverse composite maps subject points into the template.
    moved = ants.apply_transforms_to_points(3, frame, list(result.inverse_transforms))
    return moved[["x", "y", "z"]].to_numpy(dtype=np.float64) * np.diag(RAS_TO_LPS)[:3]
