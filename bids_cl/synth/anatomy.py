"""Template anatomy of the phantoms: real scans that ship in packages, turned into tissue fractions.

Sources (no download, ever):

* nilearn's bundled MNI152 2009a grey/white-matter probability maps and brain mask
  (``load_mni152_*``; the ``fetch_*`` functions would download and are never called);
* Debian ``mricron-data``'s Colin27 head with skull (``ch2.nii.gz``) and its brain (``ch2bet.nii.gz``)
  for skull, scalp and the air around the head. Colin27 sits in MNI space, so both line up in mm.

Everything lives on the MNI grid (1 mm for ``full`` phantoms, 2 mm for ``tiny``) and is built once
per process (``load_template_anatomy`` is cached).
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from bids_cl.synth.errors import EXIT_MISSING_INPUT, SynthError

#: where Debian's mricron-data puts Colin27; override with $BIDS_CL_CH2_DIR (e.g. on macOS)
CH2_DIR_ENV = "BIDS_CL_CH2_DIR"
DEFAULT_CH2_DIR = Path("/usr/share/mricron/templates")

#: channels of ``TemplateAnatomy.fractions`` (volume fractions, except ``brain`` = soft brain mask)
FRACTIONS = ("gm", "wm", "csf", "fat", "bone", "brain")

#: dominant-tissue labels used for lesion placement and the tissue rules of the tests
OTHER, CSF, GM, WM = 0, 1, 2, 3

#: bit flags of ``TemplateAnatomy.regions`` (HEAD: anything but air, grown by a voxel)
VENTRICLE, CORTEX, HEAD = 1, 2, 4

# Colin27 intensities (uint8, zero background): bone and dura are dark, fat and marrow bright.
_CH2_HEAD_THRESHOLD = 12.0
_CH2_DARK, _CH2_BRIGHT = 25.0, 110.0


@dataclass(frozen=True)
class TemplateAnatomy:
    """Tissue model on the MNI grid; arrays are float32 (fractions) or uint8 (labels, flags)."""

    affine: np.ndarray  # voxel -> MNI mm
    resolution: float  # mm, isotropic
    fractions: np.ndarray  # (len(FRACTIONS), X, Y, Z) float32
    labels: np.ndarray  # dominant tissue (OTHER/CSF/GM/WM)
    regions: np.ndarray  # VENTRICLE | CORTEX | HEAD bit flags

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)  # type: ignore[return-value]

    def channel(self, name: str) -> np.ndarray:
        return self.fractions[FRACTIONS.index(name)]


def ch2_paths() -> tuple[Path, Path]:
    """Colin27 head and brain files; a clear one-line error naming the apt package when missing."""
    folder = Path(os.environ.get(CH2_DIR_ENV, str(DEFAULT_CH2_DIR)))
    head, brain = folder / "ch2.nii.gz", folder / "ch2bet.nii.gz"
    for path in (head, brain):
        if not path.is_file():
            raise SynthError(
                f"Colin27 template {path} not found: install the Debian package mricron-data "
                f"(apt-get install mricron-data) or set ${CH2_DIR_ENV}",
                EXIT_MISSING_INPUT,
            )
    return head, brain


# ----------------------------------------------------------------------------------------------
# pure numerics


def resample_to_grid(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, ...],
    order: int = 1,
) -> np.ndarray:
    """Resample ``data`` (on ``src_affine``) onto another voxel grid of the same world space."""
    vox = np.linalg.inv(src_affine) @ dst_affine
    # anti-alias when going to a coarser grid: the template is 1 mm, the tiny grid 2 mm
    zoom = np.sqrt((vox[:3, :3] ** 2).sum(axis=0))
    if order > 0 and zoom.max() > 1.2:
        data = ndi.gaussian_filter(data.astype(np.float32), sigma=0.42 * zoom)
    matrix = vox[:3, :3]
    if np.allclose(matrix, np.diag(np.diag(matrix))):
        matrix = np.diag(matrix)  # axis-aligned: scipy takes its much faster zoom/shift path
    with warnings.catch_warnings():  # scipy notes that 1-D matrices changed meaning in 0.18
        warnings.simplefilter("ignore", UserWarning)
        return ndi.affine_transform(
            data.astype(np.float32), matrix, vox[:3, 3], output_shape=dst_shape, order=order,
            mode="constant", cval=0.0,
        )


def tissue_fractions(
    gm: np.ndarray,
    wm: np.ndarray,
    brain_mask: np.ndarray,
    head_intensity: np.ndarray,
    head_brain_mask: np.ndarray,
    resolution: float,
) -> np.ndarray:
    """Volume fractions of (gm, wm, csf, fat, bone) plus the soft brain mask, stacked as FRACTIONS.

    CSF is what the brain mask holds beyond GM and WM (sulci, ventricles) plus the subarachnoid
    space between the brain and the skull; skull and scalp come from Colin27's head outside its brain,
    split into "fat" (bright: scalp fat, marrow, muscle partly) and "bone" (dark, no MR signal) by
    its T1-weighted intensity. Air is 1 minus the sum.
    """
    sigma = 0.6 / resolution  # partial-volume edge of the binary brain mask, ~0.6 mm
    brain = np.clip(ndi.gaussian_filter(brain_mask.astype(np.float32), sigma), 0.0, 1.0)
    gm = np.clip(gm, 0, 1) * brain
    wm = np.clip(wm, 0, 1) * brain
    over = np.maximum(gm + wm, 1.0)  # probabilities may sum above 1 after smoothing
    gm, wm = gm / over, wm / over
    csf_in = np.clip(brain - gm - wm, 0.0, 1.0)

    # intracranial envelope: the MNI brain dilated by ~2.5 mm (subarachnoid CSF) joined with
    # Colin's own brain, so no scalp is drawn where Colin's brain reaches beyond the MNI mask
    ball = max(1, int(round(2.5 / resolution)))
    env = ndi.binary_dilation(brain_mask > 0.5, structure=_ball(ball))
    env |= ndi.binary_dilation(head_brain_mask > 0.5, iterations=max(1, int(round(1 / resolution))))
    env_soft = np.maximum(ndi.gaussian_filter(env.astype(np.float32), sigma), brain)
    csf = csf_in + np.clip(env_soft - brain, 0.0, 1.0)

    head = ndi.binary_fill_holes(head_intensity > _CH2_HEAD_THRESHOLD)
    head_soft = np.clip(ndi.gaussian_filter(head.astype(np.float32), sigma), 0.0, 1.0)
    outside = np.clip(1.0 - env_soft, 0.0, 1.0) * head_soft
    bright = np.clip((head_intensity - _CH2_DARK) / (_CH2_BRIGHT - _CH2_DARK), 0.0, 1.0)
    fat = outside * bright
    bone = outside * (1.0 - bright)
    return np.stack([gm, wm, csf, fat, bone, brain]).astype(np.float32)


def dominant_labels(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray) -> np.ndarray:
    """Per voxel the largest of (other, CSF, GM, WM) as OTHER/CSF/GM/WM (uint8)."""
    other = 1.0 - gm - wm - csf
    return np.argmax(np.stack([other, csf, gm, wm]), axis=0).astype(np.uint8)


def find_ventricles(labels: np.ndarray, brain: np.ndarray, resolution: float) -> np.ndarray:
    """The lateral (+ third) ventricles: the largest CSF body not connected to the outer CSF."""
    fluid = (labels == CSF) | (brain < 0.5)
    comps, _ = ndi.label(fluid)
    exterior = comps == comps[0, 0, 0]  # the grid corner is air, connected to all sulcal CSF
    inner, n = ndi.label((labels == CSF) & ~exterior)
    if n == 0:
        return np.zeros(labels.shape, bool)
    sizes = ndi.sum_labels(np.ones(labels.shape), inner, index=np.arange(1, n + 1))
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] * resolution**3 < 2000:  # mm^3; no plausible ventricle found
        return np.zeros(labels.shape, bool)
    return inner == biggest


def cortical_zone(
    labels: np.ndarray, brain: np.ndarray, affine: np.ndarray, resolution: float
) -> np.ndarray:
    """Cerebral cortex: grey matter within ~3 mm of the CSF that communicates with the outside.

    Deep nuclei border the ventricles, not the outer CSF, and the cerebellum and brainstem are cut
    out by MNI boxes: cortical lesions in this app are supratentorial.
    """
    fluid = (labels == CSF) | (brain < 0.5)
    comps, _ = ndi.label(fluid)
    exterior = comps == comps[0, 0, 0]
    near = ndi.distance_transform_edt(~exterior, sampling=resolution) <= 3.0
    zone = (labels == GM) & near
    ijk = np.indices(labels.shape, dtype=np.float32)
    x, y, z = (
        affine[a, 0] * ijk[0] + affine[a, 1] * ijk[1] + affine[a, 2] * ijk[2] + affine[a, 3]
        for a in range(3)
    )
    cerebellum = (y < -38) & (z < -8)
    brainstem = (np.abs(x) < 20) & (z < -12)
    return zone & ~cerebellum & ~brainstem & (z > -40)


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


# ----------------------------------------------------------------------------------------------
# I/O edge


def downsample2(data: np.ndarray) -> np.ndarray:
    """Halve the resolution of a 1 mm MNI map onto nilearn's 2 mm grid (same origin).

    2 mm voxel i is centred on 1 mm voxel 2i; a (1/4, 1/2, 1/4) kernel per axis turns the 1 mm
    values into the partial-volume fractions of the 2 mm voxel. It is exact, fast and avoids the
    spline resampling that ``load_mni152_*(resolution=2)`` does (seconds per map).
    """
    out = data.astype(np.float32)
    for axis in range(3):
        out = ndi.correlate1d(out, [0.25, 0.5, 0.25], axis=axis, mode="constant")
    return np.ascontiguousarray(out[::2, ::2, ::2])


def _load_nilearn(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # the load_* functions read files bundled with nilearn (no network); fetch_* would download
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    maps = [np.asarray(im.get_fdata(dtype=np.float32)) for im in (gm_img, wm_img, mask_img)]
    affine = np.asarray(mask_img.affine, float)
    if resolution == 2:
        maps = [downsample2(m) for m in maps]
        maps[2] = (maps[2] >= 0.5).astype(np.float32)
        affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    return maps[0], maps[1], maps[2], affine


@functools.lru_cache(maxsize=2)
def load_template_anatomy(resolution: int = 1) -> TemplateAnatomy:
    """Build (once per process) the tissue model on the MNI grid at 1 or 2 mm."""
    if resolution not in (1, 2):
        raise ValueError("template resolution must be 1 or 2 mm")
    head_path, brain_path = ch2_paths()
    gm, wm, mask, affine = _load_nilearn(resolution)
    shape = mask.shape
    head_img, bet_img = nib.load(head_path), nib.load(brain_path)
    head = resample_to_grid(np.asarray(head_img.dataobj), head_img.affine, affine, shape)
    bet = resample_to_grid(
        (np.asarray(bet_img.dataobj) > 0).astype(np.float32), bet_img.affine, affine, shape
    )
    res = float(resolution)
    fractions = tissue_fractions(gm, wm, mask, head, bet, res)
    labels = dominant_labels(fractions[0], fractions[1], fractions[2])
    brain = fractions[FRACTIONS.index("brain")]
    ventricles = find_ventricles(labels, brain, res)
    cortex = cortical_zone(labels, brain, affine, res)
    head_support = ndi.binary_dilation(fractions[:5].sum(axis=0) > 1e-3)
    regions = (ventricles * VENTRICLE + cortex * CORTEX + head_support * HEAD).astype(np.uint8)
    return TemplateAnatomy(
        affine=affine, resolution=res, fractions=fractions, labels=labels, regions=regions
    )
