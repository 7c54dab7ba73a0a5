"""Geometry of the phantoms: subject warps, head poses in the scanner, image grids, resampling.

Coordinate frames (all in mm):

* **world** -- the scanner frame of the NIfTI affines (RAS+ as NIfTI defines it);
* **head** -- the subject's head; a session pose (a rigid motion) places it in the scanner;
* **template** -- MNI space of the tissue model. A subject is the template seen through a random
  affine plus a smooth non-linear displacement, both defined on the head frame.

Every image is drawn by *pulling back*: for each output voxel, world -> head -> template and the
template maps are interpolated there. The anatomy in world space therefore does not depend on the
voxel grid, which is what makes masks align under every orientation and voxel-size knob.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: field of view (world mm) that every image covers: the head of Colin27 in MNI space, from the
#: top of the skull to the upper neck; the oblique grids are this box rotated about its centre
FOV_MIN = np.array([-90.0, -126.0, -68.0])
FOV_MAX = np.array([90.0, 90.0, 108.0])

ORIENTATIONS = ("RAS", "LPS", "LAS", "oblique")

#: centre (MNI mm) about which subjects are scaled and rotated: roughly the middle of the brain
BRAIN_CENTRE = np.array([0.0, -18.0, 18.0])


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees), as a 3x3 matrix."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def about_point(linear: np.ndarray, centre: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """4x4 affine applying ``linear`` about ``centre`` and then translating by ``shift``."""
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ centre + shift
    return out


def random_pose(rng: np.random.Generator, max_rot_deg: float, max_shift_mm: float) -> np.ndarray:
    """Rigid head -> world pose: how the subject lies in the scanner in one session."""
    angles = rng.uniform(-max_rot_deg, max_rot_deg, 3)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    return about_point(rotation_matrix(angles), BRAIN_CENTRE, shift)


def random_subject_affine(
    rng: np.random.Generator,
    max_rot_deg: float = 6.0,
    scale_sd: float = 0.05,
    max_shift_mm: float = 4.0,
) -> np.ndarray:
    """Head -> template affine: head size and shape differ between subjects (~5% per axis)."""
    scales = np.clip(np.exp(rng.normal(0.0, scale_sd, 3)), 0.88, 1.12)
    shear = np.eye(3) + np.triu(rng.normal(0.0, 0.02, (3, 3)), 1)
    linear = rotation_matrix(rng.uniform(-max_rot_deg, max_rot_deg, 3)) @ shear @ np.diag(scales)
    return about_point(linear, BRAIN_CENTRE, rng.uniform(-max_shift_mm, max_shift_mm, 3))


@dataclass(frozen=True)
class Displacement:
    """A smooth displacement field (mm) sampled on a regular grid of the head frame."""

    origin: np.ndarray  # mm of voxel (0, 0, 0)
    spacing: float  # mm
    field: np.ndarray  # (3, X, Y, Z) float32, mm

    def at(self, points: np.ndarray) -> np.ndarray:
        """Displacement (3, n) at head-frame points (3, n); zero-gradient outside the grid."""
        idx = (points - self.origin[:, None]) / self.spacing
        return np.stack(
            [ndi.map_coordinates(c, idx, order=1, mode="nearest", prefilter=False) for c in self.field]
        )


def random_displacement(
    rng: np.random.Generator,
    amplitude_mm: float = 2.5,
    control_spacing_mm: float = 32.0,
    grid_spacing_mm: float = 8.0,
    fov_min: np.ndarray = FOV_MIN,
    fov_max: np.ndarray = FOV_MAX,
) -> Displacement:
    """Random smooth non-linear warp: Gaussian noise on a coarse control grid, spline-upsampled.

    The RMS displacement is ``amplitude_mm``; with ~32 mm between control points the local
    stretch stays within about +-15%, so the warp is invertible and folds no tissue.
    """
    margin = control_spacing_mm
    lo, hi = fov_min - margin, fov_max + margin
    n_ctrl = np.ceil((hi - lo) / control_spacing_mm).astype(int) + 1
    ctrl = rng.normal(0.0, 1.0, (3, *n_ctrl))
    factor = control_spacing_mm / grid_spacing_mm
    field = np.stack([ndi.zoom(c, factor, order=3, mode="nearest") for c in ctrl])
    field *= amplitude_mm / max(float(np.sqrt((field**2).sum(axis=0).mean())), 1e-6)
    return Displacement(origin=lo.astype(float), spacing=grid_spacing_mm, field=field.astype(np.float32))


def grid_affine(
    orientation: str,
    voxel_size: Sequence[float],
    oblique_angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
    fov_min: np.ndarray = FOV_MIN,
    fov_max: np.ndarray = FOV_MAX,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Voxel -> world affine and shape of an image grid covering the field of view.

    Array axis a always runs along world axis a (rotated for ``oblique``); the knob flips axes the
    way converters do (LPS: DICOM order, LAS: FSL's radiological order) so that readers that ignore
    the affine break visibly.
    """
    vs = np.asarray(voxel_size, float)
    if vs.shape != (3,) or np.any(vs <= 0):
        raise ValueError(f"voxel size must be three positive numbers, got {voxel_size}")
    flips = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "LAS": (-1, 1, 1), "oblique": (1, 1, 1)}
    if orientation not in flips:
        raise ValueError(f"unknown orientation {orientation!r}; choose from {ORIENTATIONS}")
    directions = np.diag(np.asarray(flips[orientation], float))
    if orientation == "oblique":
        directions = rotation_matrix(oblique_angles_deg)
    shape = np.ceil((fov_max - fov_min) / vs - 1e-6).astype(int)
    affine = np.eye(4)
    affine[:3, :3] = directions @ np.diag(vs)
    centre = (fov_min + fov_max) / 2.0
    affine[:3, 3] = centre - affine[:3, :3] @ ((shape - 1) / 2.0)
    return affine, (int(shape[0]), int(shape[1]), int(shape[2]))


def random_oblique_angles(rng: np.random.Generator) -> np.ndarray:
    """Typical oblique prescriptions: a 8-20 degree pitch (AC-PC tilt) and a few degrees of roll/yaw."""
    pitch = rng.uniform(8.0, 20.0) * rng.choice([-1.0, 1.0])
    return np.array([pitch, rng.uniform(-5.0, 5.0), rng.uniform(-8.0, 8.0)])


@dataclass(frozen=True)
class Pullback:
    """World (scanner mm) -> template voxel index for one image of one subject."""

    world_to_head: np.ndarray  # 4x4, inverse of the head pose of this acquisition
    head_to_template: np.ndarray  # 4x4, the subject's affine
    displacement: Displacement  # head frame, applied before head_to_template
    template_affine: np.ndarray  # template voxel -> template mm

    def template_index(self, world: np.ndarray) -> np.ndarray:
        """(3, n) world points -> (3, n) fractional template voxel indices (exact)."""
        head = self.world_to_head[:3, :3] @ world + self.world_to_head[:3, 3:4]
        return self._affine_index(head) + self._warp_index(head)

    def _to_vox(self) -> np.ndarray:
        return np.linalg.inv(self.template_affine) @ self.head_to_template

    def _affine_index(self, head: np.ndarray) -> np.ndarray:
        to_vox = self._to_vox()
        return to_vox[:3, :3] @ head + to_vox[:3, 3:4]

    def _warp_index(self, head: np.ndarray) -> np.ndarray:
        # x_template = A (h + d(h)): the warp adds A_lin d(h), in template voxels
        return self._to_vox()[:3, :3] @ self.displacement.at(head)

    def warp_on_grid(
        self, vox2world: np.ndarray, shape: tuple[int, int, int], stride_mm: float = 4.0
    ) -> np.ndarray:
        """The warp term of ``template_index`` for every voxel of a grid, (3, *shape) float32.

        The warp is smooth over centimetres, so it is computed exactly on a coarse sub-grid
        (every ~4 mm) and interpolated: a few times cheaper than evaluating the displacement
        field at each of the 16 M voxels of a 0.75 mm image, and off by far less than 0.1 mm.
        """
        axes = coarse_axes(vox2world, shape, stride_mm)
        ijk = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
        world = vox2world[:3, :3] @ ijk + vox2world[:3, 3:4]
        head = self.world_to_head[:3, :3] @ world + self.world_to_head[:3, 3:4]
        coarse = self._warp_index(head).reshape(3, *(len(a) for a in axes))
        return np.stack([upsample_linear(c, shape) for c in coarse])


def _linear_weights(n: int, m: int) -> np.ndarray:
    """(n, m) matrix interpolating m corner-aligned samples linearly onto n points."""
    pos = np.linspace(0.0, m - 1.0, n)
    i0 = np.minimum(np.floor(pos).astype(int), m - 2)
    w = (pos - i0).astype(np.float32)
    out = np.zeros((n, m), np.float32)
    out[np.arange(n), i0] = 1.0 - w
    out[np.arange(n), i0 + 1] = w
    return out


def upsample_linear(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear upsampling of a corner-aligned coarse grid (first and last samples on the first
    and last voxels) to ``shape``, as three small matrix products: for smooth fields this is
    several times faster than ``ndimage.zoom``/``map_coordinates`` on millions of voxels."""
    w0, w1, w2 = (_linear_weights(n, m) for n, m in zip(shape, coarse.shape, strict=True))
    a = np.tensordot(coarse.astype(np.float32), w2, axes=([2], [1]))  # (m0, m1, n2)
    a = np.tensordot(a, w1, axes=([1], [1]))  # (m0, n2, n1)
    a = np.tensordot(w0, a, axes=([1], [0]))  # (n0, n2, n1)
    return np.ascontiguousarray(a.transpose(0, 2, 1))


def coarse_axes(vox2world: np.ndarray, shape: Sequence[int], spacing_mm: float) -> list[np.ndarray]:
    """Voxel coordinates of a corner-aligned sub-grid about ``spacing_mm`` apart (for upsample_linear)."""
    vs = np.sqrt((vox2world[:3, :3] ** 2).sum(axis=0))
    counts = [max(2, int(np.ceil((n - 1) * v / spacing_mm)) + 1) for n, v in zip(shape, vs, strict=True)]
    return [np.linspace(0, n - 1, m) for n, m in zip(shape, counts, strict=True)]


def resample(
    pullback: Pullback,
    vox2world: np.ndarray,
    shape: tuple[int, int, int],
    linear_maps: np.ndarray,
    nearest_map: np.ndarray,
    local_map: np.ndarray | None = None,
    local_key: Callable[[np.ndarray], np.ndarray] | None = None,
    chunk_voxels: int = 1 << 21,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pull template maps onto an image grid: (linear, nearest, local) resampled.

    ``nearest_map`` is resampled by nearest neighbour (labels) everywhere; ``linear_maps``
    (C, X, Y, Z) trilinearly (fractions) where the resampled ``nearest_map`` is non-zero, so a
    nearest map that flags the head skips the air around it; ``local_map`` trilinearly where the
    resampled ``local_key`` map (a function of the nearest map) is non-zero (the lesion field,
    zero almost everywhere). Done in slabs along the first axis so that the coordinates of a
    0.75 mm grid (16 M voxels) never sit in memory at once. Outside the template: 0 (air).
    """
    out_lin = np.zeros((linear_maps.shape[0], *shape), np.float32)
    out_near = np.zeros(shape, nearest_map.dtype)
    out_local = np.zeros(shape, np.float32) if local_map is not None else None
    plane = shape[1] * shape[2]
    step = max(1, chunk_voxels // plane)
    jk = np.indices(shape[1:], dtype=np.float64).reshape(2, -1)
    warp = pullback.warp_on_grid(vox2world, shape)
    # voxel -> template voxel without the warp is one affine map
    direct = pullback._to_vox() @ pullback.world_to_head @ vox2world

    def interp(volume: np.ndarray, idx: np.ndarray, sel: np.ndarray, n: int) -> np.ndarray:
        vals = np.zeros(n, np.float32)
        if sel.size:
            vals[sel] = ndi.map_coordinates(
                volume, idx[:, sel], order=1, mode="constant", cval=0.0, prefilter=False
            )
        return vals

    for i0 in range(0, shape[0], step):
        i1 = min(shape[0], i0 + step)
        slab = (i1 - i0, *shape[1:])
        ii = np.repeat(np.arange(i0, i1, dtype=np.float64), plane)
        ijk = np.vstack([ii, np.tile(jk, (1, i1 - i0))])
        idx = direct[:3, :3] @ ijk + direct[:3, 3:4]
        idx += warp[:, i0:i1].reshape(3, -1)
        near = ndi.map_coordinates(nearest_map, idx, order=0, mode="constant", cval=0, prefilter=False)
        out_near[i0:i1] = near.reshape(slab)
        inside = np.flatnonzero(near)
        for c in range(linear_maps.shape[0]):
            out_lin[c, i0:i1] = interp(linear_maps[c], idx, inside, near.size).reshape(slab)
        if local_map is not None and out_local is not None and local_key is not None:
            local = np.flatnonzero(local_key(near))
            out_local[i0:i1] = interp(local_map, idx, local, near.size).reshape(slab)
    return out_lin, out_near, out_local


def voxel_centroid_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World (scanner mm) coordinates of voxel-index points (n, 3)."""
    return ijk @ affine[:3, :3].T + affine[:3, 3]
