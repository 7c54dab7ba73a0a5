"""Skull stripping: a brain mask and a brain image (background exactly 0) on the input grid.

The published model was trained on SynthStrip-stripped images, so SynthStrip is preferred whenever its
weights are found (FreeSurfer's licence does not let us ship them): ``--synthstrip-model``, else the copy
installed by ``bids_cl-models install synthstrip`` (hash-locked in ``$BIDS_CL_HOME/models/synthstrip``),
else ``$FREESURFER_HOME/models/synthstrip.1.pt``. The weights are read with the safe loader
(``weights_only=True``), never fully unpickled. Without them we use deepbet (weights bundled, offline, ~2 s
on a CPU) and say so in ``warnings``: its masks differ from SynthStrip's, which is a domain shift for the
segmentation model. For MP2RAGE the mask is computed on INV2, whose background is
plain noise-free air, and applied to the UNI, whose salt-and-pepper background confuses most tools.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_cl.engine import registry, store
from bids_cl.engine.checkpoints import load_checkpoint
from bids_cl.engine.device import resolve_device
from bids_cl.engine.lockfile import read_lock_file, sha256_file
from bids_cl.errors import EXIT_BAD_DATA, EXIT_MISSING_INPUT, EXIT_USAGE, BidsClError
from bids_cl.preproc._images import clean_mask, like, load_3d, same_grid, voxel_volume_ml

STRATEGIES = ("auto", "synthstrip", "deepbet", "inv2", "ants", "none")
SYNTHSTRIP_WEIGHTS = registry.SYNTHSTRIP_WEIGHTS
DOMAIN_SHIFT_WARNING = (
    "skull stripping with {what} differs from the paper's SynthStrip preprocessing (domain shift): "
    "install SynthStrip's weights (bids_cl-models install synthstrip --from-file synthstrip.1.pt; or "
    "--synthstrip-model, or $FREESURFER_HOME/models/synthstrip.1.pt) for results closest to the "
    "published model"
)

# Limits for strategy "none" (input claimed to be skull-stripped already).
MAX_BORDER_NONZERO = 0.05  # fraction of the volume's outer 2-voxel shell that may be non-zero
MAX_STRAY_NONZERO = 0.02  # fraction of non-zero voxels allowed outside the largest connected object
MAX_BRAIN_ML = 2500.0  # intracranial volume of adults is ~1.2-1.9 L; a head is well above 3 L

_TORCH_LOCK = threading.Lock()  # torch.set_num_threads is process-global


@dataclass
class SkullStripResult:
    brain: nib.Nifti1Image  # float32, input grid and header, exactly 0 outside the mask
    mask: nib.Nifti1Image  # uint8 0/1, input grid and header
    strategy: str  # the strategy that ran (never "auto")
    detail: str  # one line: tool, version, which image the mask came from
    warnings: list[str] = field(default_factory=list)


# --- helpers --------------------------------------------------------------------------------------------


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def find_synthstrip_weights(synthstrip_model: str | os.PathLike[str] | None = None) -> Path | None:
    """The SynthStrip weights to use: the given path, else the installed copy (its lock must verify:
    a changed file is refused, exit 65), else ``$FREESURFER_HOME/models/synthstrip.1.pt``; else None."""
    if synthstrip_model:
        path = Path(synthstrip_model).expanduser()
        return path if path.is_file() else None
    installed = registry.installed_synthstrip()
    if installed.is_file():
        store.verified(installed.parent, f"the installed SynthStrip weights {installed}")
        return installed
    return registry.freesurfer_synthstrip()


def _weights_label(weights: Path) -> str:
    """Which SynthStrip weights ran: file name, where they came from and the start of their SHA-256."""
    if weights == registry.installed_synthstrip():
        where = "installed"
        digest = ((read_lock_file(weights.parent) or {}).get("files") or {}).get(weights.name)
    else:
        where = "FreeSurfer" if weights == registry.freesurfer_synthstrip() else "given"
        digest = None
    return f"{weights.name} ({where}, sha256 {(digest or sha256_file(weights))[:12]})"


def _missing_weights_error(synthstrip_model: str | os.PathLike[str] | None) -> BidsClError:
    where = (f"the file given ({synthstrip_model}) does not exist" if synthstrip_model
             else "none installed, no --synthstrip-model given and $FREESURFER_HOME/models/synthstrip.1.pt "
             "not found")
    return BidsClError(
        f"SynthStrip weights missing: {where}. Install them once with 'bids_cl-models install synthstrip "
        f"--from-file synthstrip.1.pt' (get the file from {registry.SYNTHSTRIP_SOURCES}), or pass "
        "--synthstrip-model, or set FREESURFER_HOME; or choose another --skull-strip strategy (deepbet, "
        "inv2, ants, none)",
        EXIT_MISSING_INPUT,
    )


def load_synthstrip_model(weights: str | os.PathLike[str], device: str = "cpu"):  # -> StripModel
    """nipreps-synthstrip's ``StripModel`` with FreeSurfer's weights (a checkpoint holding
    ``model_state_dict``), read with the safe loader; ``BidsClError`` (65) for anything else."""
    try:
        from nipreps.synthstrip.model import StripModel
    except ImportError as exc:
        raise BidsClError("SynthStrip needs the Python package nipreps-synthstrip "
                          "(pip install nipreps-synthstrip)", EXIT_MISSING_INPUT) from exc
    dev = resolve_device(device)
    checkpoint = load_checkpoint(weights, map_location=dev, what="SynthStrip weights")
    state = checkpoint.get("model_state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise BidsClError(f"{weights} is not a SynthStrip checkpoint (no 'model_state_dict')", EXIT_BAD_DATA)
    model = StripModel()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # other layer names or shapes: another network's weights
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise BidsClError(f"{weights} does not hold SynthStrip's network ({first[:200]})",
                          EXIT_BAD_DATA) from exc
    return model.to(dev).eval()


def _finite(img: nib.Nifti1Image) -> np.ndarray:
    data = np.asanyarray(img.dataobj).astype(np.float32)
    return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)


def _result(img: nib.Nifti1Image, mask: np.ndarray, strategy: str, detail: str,
            warnings: list[str]) -> SkullStripResult:
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise BidsClError(f"skull stripping ({strategy}) produced an empty brain mask", EXIT_BAD_DATA)
    brain = np.where(mask, _finite(img), 0.0)
    return SkullStripResult(
        brain=like(img, brain, np.float32), mask=like(img, mask, np.uint8),
        strategy=strategy, detail=detail, warnings=warnings,
    )


def _mask_to_grid(mask_img: nib.Nifti1Image, target: nib.Nifti1Image) -> np.ndarray:
    """A mask computed on another image of the same session (INV2), on the target's grid."""
    if same_grid(mask_img, target):
        return np.asanyarray(mask_img.dataobj) > 0
    from nibabel.processing import resample_from_to

    return np.asanyarray(resample_from_to(mask_img, target, order=0).dataobj) > 0


# --- deepbet ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _deepbet_model(no_gpu: bool):  # -> deepbet.BrainExtraction
    import warnings

    from deepbet import BrainExtraction

    with warnings.catch_warnings():
        # torch >= 2.10 marks torch.jit.load (deepbet's loader) deprecated: not actionable for our users.
        warnings.simplefilter("ignore", FutureWarning)
        return BrainExtraction(no_gpu=no_gpu)


def deepbet_mask(img: nib.Nifti1Image, *, nthreads: int = 1, device: str = "auto") -> np.ndarray:
    """deepbet's brain mask (bool, on ``img``'s grid). deepbet reorients internally and back."""
    import torch

    dev = resolve_device(device)
    # deepbet picks the GPU by itself when one exists; no_gpu pins the CPU when asked.
    bet = _deepbet_model(no_gpu=(dev.type == "cpu"))
    src = nib.Nifti1Image(_finite(img), img.affine)
    with _TORCH_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, int(nthreads)))
        try:
            _, mask_img, _ = bet.run(src)
        except AssertionError as exc:  # deepbet asserts when its first stage finds no head at all
            raise BidsClError(f"deepbet found no brain in the image ({exc})", EXIT_BAD_DATA) from exc
        finally:
            torch.set_num_threads(before)
    return np.asanyarray(mask_img.dataobj) > 0


# --- SynthStrip ------------------------------------------------------------------------------------------


def synthstrip_mask(img: nib.Nifti1Image, weights: Path, *, nthreads: int = 1, device: str = "auto",
                    border_mm: float = 1.0) -> np.ndarray:
    """SynthStrip (nipreps-synthstrip's model code, FreeSurfer weights) mask on ``img``'s grid.

    Same steps as ``nipreps-synthstrip``'s command line (conform to 1 mm LIA, scale to the 99th
    percentile, predict the signed distance to the brain surface, back to the input grid, keep distance
    < border, largest component, fill holes), with the paper's default border of 1 mm.
    """
    import torch

    try:
        from nipreps.synthstrip.cli import conform, resample_like
    except ImportError as exc:
        raise BidsClError("SynthStrip needs the Python package nipreps-synthstrip "
                          "(pip install nipreps-synthstrip)", EXIT_MISSING_INPUT) from exc

    dev = resolve_device(device)
    model = load_synthstrip_model(weights, device=dev)
    src = nib.Nifti1Image(_finite(img), img.affine)
    conformed = conform(src)
    data = conformed.get_fdata(dtype=np.float32)
    data -= data.min()
    scale = np.percentile(data, 99)
    data = np.clip(data / scale, 0, 1) if scale > 0 else data
    with _TORCH_LOCK, torch.no_grad():
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, int(nthreads)))
        try:
            sdt = model(torch.from_numpy(data[None, None]).to(dev)).cpu().numpy().squeeze()
        finally:
            torch.set_num_threads(before)
    sdt_img = resample_like(nib.Nifti1Image(sdt, conformed.affine, None), src,
                            output_dtype="int16", cval=100)
    inside = np.asanyarray(sdt_img.dataobj).astype(np.int16) < border_mm
    return clean_mask(inside)


# --- template-based (antspyx) ----------------------------------------------------------------------------


def ants_mask(img: nib.Nifti1Image, *, nthreads: int = 1, seed: int = 42) -> tuple[np.ndarray, dict]:
    """Warp the MNI152NLin2009aSym brain mask onto the head (see ``_ants_worker.task_brain_mask``)."""
    from bids_cl.preproc._ants_worker import run_isolated
    from bids_cl.preproc.templates import nilearn_template

    tpl, tpl_mask = nilearn_template(resolution=2)  # from the nilearn package: no TemplateFlow needed
    with tempfile.TemporaryDirectory(prefix="bids_cl_antsbet_") as tmp:
        paths = {name: str(Path(tmp, f"{name}.nii.gz")) for name in ("head", "tpl", "tplmask", "out")}
        nib.save(nib.Nifti1Image(_finite(img), img.affine), paths["head"])
        nib.save(tpl, paths["tpl"])
        nib.save(tpl_mask, paths["tplmask"])
        info = run_isolated("brain_mask", {
            "head": paths["head"], "template": paths["tpl"], "template_mask": paths["tplmask"],
            "out_mask": paths["out"], "seed": seed,
            # 2 mm is plenty for a mask that is smoothed anyway; coarser inputs are used as they are.
            "work_mm": max(2.0, float(min(img.header.get_zooms()[:3]))),
        }, nthreads=nthreads)
        prob = np.asanyarray(nib.load(paths["out"]).dataobj)
    return clean_mask(prob > 0.5), info


# --- already stripped ------------------------------------------------------------------------------------


def _border_shell(shape: tuple[int, ...], width: int = 2) -> np.ndarray:
    shell = np.ones(shape, dtype=bool)
    inner = tuple(slice(width, max(width, n - width)) for n in shape)
    shell[inner] = False
    return shell


def check_stripped(img: nib.Nifti1Image) -> tuple[np.ndarray, list[str]]:
    """Validate a supposedly skull-stripped image; return its mask and notes. Raises 65 if not stripped.

    A constant non-zero background (SynthStrip writes ``min(0, image minimum)`` there, so a UNI with
    negative values gets a negative background) is accepted and later set to 0.
    """
    data = _finite(img)
    notes: list[str] = []
    shell = _border_shell(data.shape)
    background = 0.0
    border_values = np.unique(data[shell])
    if border_values.size == 1 and border_values[0] != 0:
        background = float(border_values[0])
        notes.append(f"constant background value {background:g} set to 0")
    foreground = data != background
    if not foreground.any():
        raise BidsClError("skull strip 'none': the image is empty (all voxels equal)", EXIT_BAD_DATA)
    border_frac = float(foreground[shell].mean())
    if border_frac > MAX_BORDER_NONZERO:
        raise BidsClError(
            f"skull strip 'none': {100 * border_frac:.0f}% of the image border is non-zero, so the "
            "background is not zero: the image is not skull-stripped (or is an MP2RAGE UNI with its noisy "
            "background); choose --skull-strip auto/deepbet/inv2/synthstrip", EXIT_BAD_DATA,
        )
    labels, n = ndimage.label(foreground)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        stray = 1.0 - sizes.max() / sizes.sum()
        if stray > MAX_STRAY_NONZERO:
            raise BidsClError(
                f"skull strip 'none': {100 * stray:.1f}% of the non-zero voxels are scattered outside the "
                "main object (salt-and-pepper background?): the image is not skull-stripped", EXIT_BAD_DATA,
            )
    mask = clean_mask(foreground)
    volume = float(mask.sum()) * voxel_volume_ml(img)
    if volume > MAX_BRAIN_ML:
        raise BidsClError(
            f"skull strip 'none': the non-zero region is {volume:.0f} mL, more than any brain "
            f"(limit {MAX_BRAIN_ML:.0f} mL): the image still contains the head; choose another "
            "--skull-strip strategy", EXIT_BAD_DATA,
        )
    return mask, notes


# --- entry point -----------------------------------------------------------------------------------------


def skull_strip(
    t1w_img: Any,
    *,
    strategy: str = "auto",
    inv2_img: Any = None,
    synthstrip_model: str | os.PathLike[str] | None = None,
    nthreads: int = 1,
    is_mp2rage: bool = False,
    device: str = "auto",
    seed: int = 42,
) -> SkullStripResult:
    """Skull-strip a T1w/UNI image (nibabel image or path). See the module docstring for the strategies.

    ``auto``: SynthStrip if its weights are found; else for MP2RAGE with INV2, deepbet on INV2 with the
    mask applied to the UNI; else deepbet on the image. ``inv2_img`` given implies MP2RAGE.
    """
    if strategy not in STRATEGIES:
        raise BidsClError(f"unknown skull-strip strategy {strategy!r}; one of {', '.join(STRATEGIES)}",
                          EXIT_USAGE)
    img = load_3d(t1w_img, "T1w image")
    inv2 = None if inv2_img is None else load_3d(inv2_img, "INV2 image")
    mp2rage = is_mp2rage or inv2 is not None
    warnings: list[str] = []

    weights = find_synthstrip_weights(synthstrip_model) if strategy in ("auto", "synthstrip") else None
    if strategy == "auto":
        if synthstrip_model and weights is None:
            # An explicit path that does not exist is a mistake to report, not a reason to fall back.
            raise _missing_weights_error(synthstrip_model)
        if weights is not None:
            strategy = "synthstrip"
        elif inv2 is not None:
            strategy = "inv2"
        else:
            strategy = "deepbet"
            if mp2rage:
                warnings.append("MP2RAGE without an INV2 image: deepbet ran on the UNI, whose noisy "
                                "background can leak into the mask; check it in the report")

    if strategy == "synthstrip":
        if weights is None:
            raise _missing_weights_error(synthstrip_model)
        mask = synthstrip_mask(img, weights, nthreads=nthreads, device=device)
        detail = (f"SynthStrip (nipreps-synthstrip {_package_version('nipreps-synthstrip')}, weights "
                  f"{_weights_label(weights)}, border 1 mm) on the {'UNI' if mp2rage else 'T1w'}")
        return _result(img, mask, strategy, detail, warnings)

    if strategy == "none":
        mask, notes = check_stripped(img)
        detail = "none: input already skull-stripped (mask = non-zero voxels, holes filled)"
        if notes:
            detail += "; " + "; ".join(notes)
        return _result(img, mask, strategy, detail, warnings)

    if strategy == "inv2":
        if inv2 is None:
            raise BidsClError("skull strip 'inv2' needs the MP2RAGE INV2 image (inv-2_part-mag_MP2RAGE)",
                              EXIT_MISSING_INPUT)
        inv2_mask = deepbet_mask(inv2, nthreads=nthreads, device=device)
        mask = _mask_to_grid(like(inv2, inv2_mask, np.uint8), img)
        detail = f"deepbet {_package_version('deepbet')} on INV2, mask applied to the UNI"
        if not same_grid(inv2, img):
            detail += " (resampled to the UNI grid, nearest neighbour)"
        warnings.append(DOMAIN_SHIFT_WARNING.format(what="deepbet on INV2"))
        return _result(img, clean_mask(mask), strategy, detail, warnings)

    if strategy == "deepbet":
        mask = deepbet_mask(img, nthreads=nthreads, device=device)
        detail = f"deepbet {_package_version('deepbet')} on the {'UNI' if mp2rage else 'T1w'}"
        warnings.append(DOMAIN_SHIFT_WARNING.format(what="deepbet"))
        return _result(img, mask, strategy, detail, warnings)

    # strategy == "ants"
    mask, info = ants_mask(img, nthreads=nthreads, seed=seed)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in info["stages"].items())
    detail = (f"antspyx {_package_version('antspyx')} template-based: MNI152NLin2009aSym brain mask "
              f"(nilearn) warped to the N4-corrected head, affine + SyN at {info['work_mm']:g} mm ({stages})")
    warnings.append(DOMAIN_SHIFT_WARNING.format(what="a template-warped mask (antspyx)"))
    if mp2rage:
        warnings.append("template-based extraction on a UNI: its noisy background disturbs the head "
                        "threshold and N4; prefer --skull-strip inv2")
    return _result(img, mask, strategy, detail, warnings)
