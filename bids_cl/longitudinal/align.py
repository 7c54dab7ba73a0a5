"""Symmetric rigid alignment of two sessions of one participant, and their halfway space.

Neither visit is favoured: the rigid transform is estimated in both directions (earlier -> later and
later -> earlier, antspyx in a worker process with one thread and the run's seed, so it is
deterministic: :func:`bids_cl.preproc._ants_worker.run_isolated`) and the two estimates are averaged;
both images are then moved *half way* (``S @ S == M``), so both are interpolated alike and lesion
overlaps are counted on equal terms. Everything but the registration itself is numpy/scipy.

Conventions: transforms are 4x4 matrices on scanner (RAS+) millimetres; ``M`` maps a point of the
earlier session's scanner space to the same anatomy in the later session's scanner space.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bids_cl.preproc._ants_worker import SLOPPY_MM, run_isolated
from bids_cl.preproc._images import RAS_TO_LPS, load_3d

RIGID_WORK_MM = 2.0  # resolution the rigid transform is estimated at (finer images are resampled)
BIAS_SIGMA_MM = 10.0  # scale of the local mean the quality divides out (smooth intensity bias)


def itk_to_ras(parameters: list[float], fixed_parameters: list[float]) -> np.ndarray:
    """The 4x4 RAS matrix of an ITK affine transform (which maps fixed LPS points to moving ones)."""
    a = np.asarray(parameters[:9], dtype=np.float64).reshape(3, 3)
    t = np.asarray(parameters[9:12], dtype=np.float64)
    c = np.asarray(fixed_parameters[:3], dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = t + c - a @ c
    return RAS_TO_LPS @ lps @ RAS_TO_LPS


def rigid_fixed_to_moving(fixed: str | Path, moving: str | Path, *, seed: int, nthreads: int = 1,
                          sloppy: bool = False) -> np.ndarray:
    """Rigid registration (antspyx, worker process): the RAS matrix mapping fixed points to moving.

    Estimated at :data:`RIGID_WORK_MM` (images finer than that are resampled; ``sloppy``: 4 mm)."""
    with tempfile.TemporaryDirectory(prefix="bids_cl_rigid_") as tmp:
        out = run_isolated("rigid", {"fixed": str(Path(fixed).absolute()),
                                     "moving": str(Path(moving).absolute()),
                                     "out_prefix": f"{tmp}/rigid_", "seed": int(seed),
                                     "work_mm": SLOPPY_MM if sloppy else RIGID_WORK_MM},
                           nthreads=nthreads)
    return itk_to_ras(out["parameters"], out["fixed_parameters"])


def average_rigid(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The mean of two rigid transforms (rotation mean, translation mean)."""
    rot = Rotation.from_matrix(np.stack([a[:3, :3], b[:3, :3]])).mean()
    out = np.eye(4)
    out[:3, :3] = rot.as_matrix()
    out[:3, 3] = (a[:3, 3] + b[:3, 3]) / 2.0
    return out


def halfway(m: np.ndarray) -> np.ndarray:
    """The rigid square root ``S`` of a rigid ``M`` (``S @ S == M``): half the rotation, half the way."""
    half_rot = Rotation.from_matrix(m[:3, :3]).as_rotvec() / 2.0
    r = Rotation.from_rotvec(half_rot).as_matrix()
    s = np.eye(4)
    s[:3, :3] = r
    s[:3, 3] = np.linalg.solve(r + np.eye(3), m[:3, 3])
    return s


def symmetric_rigid(before_brain: str | Path, after_brain: str | Path, *, seed: int,
                    nthreads: int = 1, sloppy: bool = False) -> np.ndarray:
    """``M`` (earlier -> later scanner space) from registrations in both directions, averaged."""
    after_to_before = rigid_fixed_to_moving(after_brain, before_brain, seed=seed, nthreads=nthreads,
                                            sloppy=sloppy)
    before_to_after = rigid_fixed_to_moving(before_brain, after_brain, seed=seed, nthreads=nthreads,
                                            sloppy=sloppy)
    return average_rigid(np.linalg.inv(after_to_before), before_to_after)


def resample(data: np.ndarray, source_affine: np.ndarray, grid_affine: np.ndarray,
             grid_shape: tuple[int, ...], grid_to_source_world: np.ndarray, *, order: int) -> np.ndarray:
    """Sample ``data`` (on ``source_affine``) at the voxels of a grid; ``grid_to_source_world`` maps the
    grid's world points to the source's world. ``order`` 0 (labels) or 1 (intensities, probabilities);
    outside the source is 0. Deterministic (scipy, one thread)."""
    vox = np.linalg.inv(source_affine) @ grid_to_source_world @ grid_affine
    values = np.asarray(data)
    if order == 0:
        return ndimage.affine_transform(values, vox[:3, :3], offset=vox[:3, 3],
                                        output_shape=tuple(grid_shape), order=0, mode="constant",
                                        cval=0, output=values.dtype)
    return ndimage.affine_transform(values.astype(np.float32), vox[:3, :3], offset=vox[:3, 3],
                                    output_shape=tuple(grid_shape), order=1, mode="constant", cval=0.0)


class HalfwaySpace:
    """The pair's common grid: the later session's voxel grid, in the halfway world between the two.

    ``from_before``/``from_after`` resample an image of either session onto it; ``to_after`` maps an
    earlier image onto the later session's own grid (the full ``M``).
    """

    def __init__(self, before_to_after: np.ndarray, before_affine: np.ndarray, after_affine: np.ndarray,
                 after_shape: tuple[int, ...]) -> None:
        self.m = np.asarray(before_to_after, dtype=np.float64)
        self.s = halfway(self.m)
        self.before_affine = np.asarray(before_affine, dtype=np.float64)
        self.after_affine = np.asarray(after_affine, dtype=np.float64)
        self.shape = tuple(int(n) for n in after_shape[:3])
        self.spacing = tuple(float(v) for v in np.sqrt((self.after_affine[:3, :3] ** 2).sum(axis=0)))

    def from_before(self, data: np.ndarray, *, order: int) -> np.ndarray:
        return resample(data, self.before_affine, self.after_affine, self.shape, np.linalg.inv(self.s),
                        order=order)

    def from_after(self, data: np.ndarray, *, order: int) -> np.ndarray:
        return resample(data, self.after_affine, self.after_affine, self.shape, self.s, order=order)

    def to_after(self, data: np.ndarray, *, order: int) -> np.ndarray:
        return resample(data, self.before_affine, self.after_affine, self.shape, np.linalg.inv(self.m),
                        order=order)

    def points_to_after(self, xyz: np.ndarray) -> np.ndarray:
        """Earlier scanner points (N, 3) in the later session's scanner space."""
        pts = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        return pts @ self.m[:3, :3].T + self.m[:3, 3]


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images inside a mask (0 when either is constant there)."""
    sel = np.asarray(mask, dtype=bool)
    if sel.sum() < 2:
        return 0.0
    x, y = a[sel].astype(np.float64), b[sel].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def flatten_bias(data: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...],
                 sigma_mm: float = BIAS_SIGMA_MM) -> np.ndarray:
    """The image divided by its local mean inside ``mask`` (Gaussian, ``sigma_mm``; normalised
    convolution, so the brain's edge does not darken it): a smooth multiplicative intensity bias
    (receive/transmit fields that differ between sessions) cancels, anatomy's contrast stays."""
    sigma = [sigma_mm / v for v in spacing]
    inside = np.asarray(mask, dtype=bool)
    weights = ndimage.gaussian_filter(inside.astype(np.float32), sigma)
    local = ndimage.gaussian_filter(np.where(inside, data, 0).astype(np.float32), sigma)
    mean = local / np.maximum(weights, 1e-6)
    return np.where(inside & (mean > 0), data / np.where(mean > 0, mean, 1.0), 0.0)


def alignment_quality(before_brain: Any, before_mask: Any, after_brain: Any, after_mask: Any,
                      before_to_after: np.ndarray) -> float:
    """Correlation of the two skull-stripped images in the halfway space, inside both brain masks,
    after :func:`flatten_bias` (so that a bias field that differs between sessions does not pass for
    misalignment: a 7 T phantom pair scored 0.64 on raw intensities and 0.96 flattened)."""
    b_img, a_img = load_3d(before_brain, "earlier image"), load_3d(after_brain, "later image")
    space = HalfwaySpace(before_to_after, b_img.affine, a_img.affine, a_img.shape)
    b = space.from_before(np.asanyarray(b_img.dataobj), order=1)
    a = space.from_after(np.asanyarray(a_img.dataobj), order=1)
    bm = space.from_before(np.asanyarray(load_3d(before_mask, "earlier brain mask").dataobj) > 0, order=0)
    am = space.from_after(np.asanyarray(load_3d(after_mask, "later brain mask").dataobj) > 0, order=0)
    both = bm & am
    return correlation(flatten_bias(b, both, space.spacing), flatten_bias(a, both, space.spacing), both)
