"""Small image helpers shared by the preprocessing modules (nibabel <-> antspyx, masks, overlap)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from bids_cl.errors import EXIT_BAD_DATA, EXIT_MISSING_INPUT, BidsClError

if TYPE_CHECKING:  # antspyx is imported lazily: it takes seconds and most callers never need it
    import ants

# nibabel's affines map voxels to RAS+ millimetres; ITK (antspyx) uses LPS+. Flipping the first two
# world axes converts between them in both directions.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_3d(img: Any, what: str = "image") -> nib.Nifti1Image:
    """Return a 3D NIfTI image from a nibabel image or a path (a trailing 4th axis of length 1 is dropped)."""
    if isinstance(img, (str, os.PathLike)):
        if not Path(img).is_file():
            raise BidsClError(f"{what} not found: {img}", EXIT_MISSING_INPUT)
        try:
            img = nib.load(str(img))
        except Exception as exc:  # nibabel raises several types for corrupt files
            raise BidsClError(f"cannot read {what} {img}: {exc}", EXIT_BAD_DATA) from exc
    if img.ndim == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if img.ndim != 3:
        raise BidsClError(f"{what} must be 3D, got shape {img.shape}", EXIT_BAD_DATA)
    if not isinstance(img, nib.Nifti1Image):
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    return img


def like(img: nib.Nifti1Image, data: np.ndarray, dtype: Any = np.float32) -> nib.Nifti1Image:
    """A new image on ``img``'s grid and header with ``data`` stored as ``dtype`` without scaling."""
    header = img.header.copy()
    header.set_data_dtype(dtype)
    out = nib.Nifti1Image(np.asarray(data, dtype=dtype), img.affine, header)
    # A copied header may carry scl_slope/inter (e.g. uint8 inputs): reset, we store raw values.
    out.header.set_slope_inter(None, None)
    return out


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, atol: float = 1e-3) -> bool:
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=atol)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    denom = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / denom if denom else 1.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Largest connected component with its holes filled: a brain mask is one solid object."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    return ndimage.binary_fill_holes(largest_component(mask))


def voxel_volume_ml(img: nib.Nifti1Image) -> float:
    return float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0


# --- antspyx conversion ----------------------------------------------------------------------------
# We convert through the affine ourselves (rather than ants.from_nibabel_nifti) because that helper
# prints to stdout and edits the input header's units; the maths is the same RAS->LPS flip.


def to_ants(img: nib.Nifti1Image, dtype: Any = np.float32) -> ants.ANTsImage:
    import ants

    lps = RAS_TO_LPS @ img.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    # ITK wants an orthonormal direction matrix: project out any (tiny) shear.
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt
    data = np.asanyarray(img.dataobj).astype(dtype, copy=False)
    return ants.from_numpy(
        np.ascontiguousarray(data),
        origin=lps[:3, 3].tolist(),
        spacing=spacing.tolist(),
        direction=direction,
    )


def ants_affine(aimg: ants.ANTsImage) -> np.ndarray:
    """The nibabel (RAS+) voxel-to-world affine of an antspyx image."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(aimg.direction) * np.asarray(aimg.spacing)[None, :]
    lps[:3, 3] = aimg.origin
    return RAS_TO_LPS @ lps


def from_ants(aimg: ants.ANTsImage, reference: nib.Nifti1Image | None = None,
              dtype: Any = np.float32) -> nib.Nifti1Image:
    """Back to nibabel; with ``reference`` (same grid) its header is reused so sform/qform codes survive."""
    data = aimg.numpy()
    if reference is not None:
        return like(reference, data, dtype)
    out = nib.Nifti1Image(data.astype(dtype), ants_affine(aimg))
    out.header.set_xyzt_units("mm")
    return out


def downsample(img: nib.Nifti1Image, voxel_mm: float, order: int = 1) -> nib.Nifti1Image:
    """Resample to isotropic ``voxel_mm`` over the same field of view (for fast tests and coarse steps)."""
    from nibabel.processing import resample_to_output

    return resample_to_output(img, voxel_sizes=(voxel_mm,) * 3, order=order)
