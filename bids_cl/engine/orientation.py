"""Voxel-order bookkeeping between a NIfTI image and the arrays nnU-Net's network was trained on.

nnU-Net ignores the affine except for the voxel spacing, so the network only ever sees voxel order. bids_cl
therefore (1) permutes/flips the image to the model's training orientation (closest axis codes; an oblique
image keeps its obliquity, exactly as the training images did: no resampling), (2) hands nnU-Net the array in
its reader's axis order and (3) undoes both on the outputs, so they land exactly on the input grid.

Axis order of nnU-Net readers. ``SimpleITKIO`` returns ``sitk.GetArrayFromImage``: the NIfTI voxel array
transposed to (k, j, i), with spacing reversed to (dk, dj, di). ``NibabelIO`` transposes ``get_fdata()`` the
same way on purpose. ``*WithReorient`` readers first reorient to RAS. So for all of them: array =
``data.transpose(2, 1, 0)`` after reorientation, spacing = ``zooms[::-1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform


@dataclass(frozen=True)
class Reorientation:
    """The permutation/flip from an image's voxel order to the model's, and back."""

    to_model: np.ndarray    # nibabel ornt array: input voxel axes -> model voxel axes
    to_input: np.ndarray    # its inverse
    input_shape: tuple[int, ...]
    model_zooms: tuple[float, ...]  # voxel sizes along the model-order axes (i, j, k)

    @property
    def is_identity(self) -> bool:
        return bool(np.all(self.to_model[:, 0] == np.arange(3)) and np.all(self.to_model[:, 1] == 1))


def plan_reorientation(affine: np.ndarray, shape: tuple[int, ...], zooms: tuple[float, ...],
                       axcodes: str = "RAS") -> Reorientation:
    """How to bring an image with ``affine`` to the axis codes ``axcodes`` (nibabel convention)."""
    current = io_orientation(affine)
    target = axcodes2ornt(tuple(axcodes))
    to_model = ornt_transform(current, target)
    to_input = ornt_transform(target, current)
    perm = to_model[:, 0].astype(int)
    model_zooms = [0.0, 0.0, 0.0]
    for in_axis, out_axis in enumerate(perm):
        model_zooms[out_axis] = float(zooms[in_axis])
    return Reorientation(to_model, to_input, tuple(int(s) for s in shape[:3]), tuple(model_zooms))


def to_model_order(data: np.ndarray, plan: Reorientation) -> np.ndarray:
    """Input voxel array -> model voxel order (a view where possible: flips and transposes only)."""
    return data if plan.is_identity else apply_orientation(data, plan.to_model)


def to_input_order(data: np.ndarray, plan: Reorientation) -> np.ndarray:
    """Model voxel order -> input voxel order (the exact inverse of ``to_model_order``)."""
    out = data if plan.is_identity else apply_orientation(data, plan.to_input)
    if out.shape[:3] != plan.input_shape:
        raise AssertionError(f"reorientation bug: {out.shape} != {plan.input_shape}")
    return out


def to_nnunet_array(model_order: np.ndarray) -> np.ndarray:
    """(i, j, k) voxel array -> nnU-Net's (c=1, k, j, i) float32 array (the reader's axis order)."""
    return np.ascontiguousarray(model_order.transpose(2, 1, 0)[None], dtype=np.float32)


def nnunet_spacing(model_zooms: tuple[float, ...]) -> list[float]:
    """Voxel sizes in nnU-Net's axis order: reversed, as SimpleITKIO and NibabelIO report them."""
    return [float(z) for z in model_zooms[::-1]]


def from_nnunet_array(array: np.ndarray) -> np.ndarray:
    """nnU-Net's (k, j, i) output -> (i, j, k) voxel order."""
    return array.transpose(2, 1, 0)


def model_affine(affine: np.ndarray, plan: Reorientation) -> np.ndarray:
    """Affine of the reoriented image (for checks; the outputs use the input's own header)."""
    return affine @ inv_ornt_aff(plan.to_model, plan.input_shape)


def image_like(data: np.ndarray, reference: nib.spatialimages.SpatialImage, dtype: type) -> nib.Nifti1Image:
    """A NIfTI with ``reference``'s grid and header (affine, qform/sform and their codes, units)."""
    header = reference.header.copy() if isinstance(reference, nib.Nifti1Image) else None
    klass = type(reference) if isinstance(reference, nib.Nifti1Image) else nib.Nifti1Image
    img = klass(np.asarray(data, dtype=dtype), reference.affine, header)
    img.set_data_dtype(dtype)
    if header is not None:
        # The constructor refreshes the sform from the affine; put both forms and codes back as they were.
        qform, qcode = reference.header.get_qform(coded=True)
        sform, scode = reference.header.get_sform(coded=True)
        img.header.set_qform(qform if qform is not None else reference.header.get_qform(),
                             code=int(qcode or 0))
        img.header.set_sform(sform if sform is not None else reference.affine, code=int(scode or 0))
        # Outputs are exact values: no intensity scaling inherited from the input.
        img.header.set_slope_inter(1.0, 0.0)
        img.header["cal_min"], img.header["cal_max"] = 0, 0
    return img
