"""Registration accuracy where the truth is known: an image warped by a known smooth field and rigid motion.

A *template* image T (a phantom brain) plays the fixed image. The *subject* is T seen through a known map
``phi`` from subject world (RAS mm) to template world: ``phi(x) = u(R x + t)`` with a rigid motion
``(R, t)`` followed by a smooth, invertible displacement ``u(y) = y + d(y)`` (a few low-frequency sine
waves). The subject is stored on the template's voxel grid with the affine ``inv(M) @ A`` (M the rigid
motion, A the template affine), so the rigid part lives in the header (nothing leaves the field of view)
and the voxels carry only the smooth part: ``S[v] = T(u(A v))``. Points, lesion centroids and tissue maps
of the subject therefore have exact template positions, and a registration's errors can be measured:

* ``point_errors``: ``|mapped(x) - phi(x)|`` for points inside the subject's brain;
* lesion centroids: the subject's lesion centroid mapped vs the template lesion's centroid (the truth's
  own floor, ``phi`` applied to the subject centroid, is reported beside it);
* tissue Dice: the subject's label map warped onto the template grid vs the template's labels.

Pure numpy/scipy; float32 volumes (no full-volume float64 copy; coordinates are made slab by slab).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class KnownWarp:
    """``phi``: subject RAS mm -> template RAS mm (rigid, then a smooth displacement)."""

    motion: np.ndarray  # (4, 4) rigid motion M (subject world -> intermediate world)
    directions: np.ndarray  # (K, 3) unit wave vectors
    amplitudes: np.ndarray  # (K, 3) displacement amplitude per wave and axis (mm)
    wavelength_mm: float
    phases: np.ndarray  # (K,)
    center: np.ndarray  # (3,) world point the waves are centred on

    def displacement(self, y: np.ndarray) -> np.ndarray:
        """d(y) for (N, 3) world points (mm); float64 for N points only."""
        y = np.asarray(y, dtype=np.float64).reshape(-1, 3) - self.center
        arg = 2.0 * np.pi * (y @ self.directions.T) / self.wavelength_mm + self.phases  # (N, K)
        return np.sin(arg) @ self.amplitudes

    def smooth(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64).reshape(-1, 3)
        return y + self.displacement(y)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """phi(x): the template position of subject world points (N, 3)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, 3)
        return self.smooth(x @ self.motion[:3, :3].T + self.motion[:3, 3])

    def max_gradient(self) -> float:
        """Upper bound of |grad d| (spectral norm): below 1 the smooth part is invertible."""
        k = 2.0 * np.pi / self.wavelength_mm
        return float(sum(k * np.linalg.norm(a) for a in self.amplitudes))


def rigid_matrix(rotation_deg: tuple[float, float, float], translation_mm: tuple[float, float, float],
                 center: np.ndarray) -> np.ndarray:
    """A 4x4 rotation (x, then y, then z axis, degrees) about ``center`` followed by a translation."""
    rx, ry, rz = np.deg2rad(rotation_deg)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
           @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = np.asarray(center) - rot @ np.asarray(center) + np.asarray(translation_mm)
    return out


def make_known_warp(center: np.ndarray, *, seed: int = 0, amplitude_mm: float = 2.5,
                    wavelength_mm: float = 120.0, waves: int = 3,
                    rotation_deg: tuple[float, float, float] = (6.0, -4.0, 10.0),
                    translation_mm: tuple[float, float, float] = (8.0, -6.0, 5.0)) -> KnownWarp:
    """A seeded smooth field (``waves`` sine waves, each of peak ``amplitude_mm`` along a random axis)
    after a rigid motion about ``center``; raises if the field would fold (|grad d| >= 0.5)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    axes = rng.normal(size=(waves, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    warp = KnownWarp(motion=rigid_matrix(rotation_deg, translation_mm, np.asarray(center, float)),
                     directions=directions, amplitudes=amplitude_mm * axes, wavelength_mm=wavelength_mm,
                     phases=rng.uniform(0, 2 * np.pi, size=waves),
                     center=np.asarray(center, dtype=np.float64))
    if warp.max_gradient() >= 0.5:
        raise ValueError(f"displacement too steep to stay invertible (|grad| <= {warp.max_gradient():.2f})")
    return warp


def subject_affine(warp: KnownWarp, template_affine: np.ndarray) -> np.ndarray:
    """The subject's affine: the template grid moved by the inverse rigid motion (``inv(M) @ A``)."""
    return np.linalg.inv(warp.motion) @ np.asarray(template_affine, dtype=np.float64)


def warp_volume(volume: np.ndarray, template_affine: np.ndarray, warp: KnownWarp, *,
                order: int = 1) -> np.ndarray:
    """The subject's voxels ``S[v] = T(u(A v))`` (``order`` 1: linear, 0: nearest for labels)."""
    affine = np.asarray(template_affine, dtype=np.float64)
    inv = np.linalg.inv(affine)
    volume = np.asarray(volume)
    out = np.zeros(volume.shape, dtype=volume.dtype if order == 0 else np.float32)
    source = volume if order == 0 else volume.astype(np.float32, copy=False)
    jj, kk = np.meshgrid(np.arange(volume.shape[1]), np.arange(volume.shape[2]), indexing="ij")
    for i in range(volume.shape[0]):  # slab by slab: coordinates for one slice at a time
        vox = np.stack([np.full(jj.size, i), jj.ravel(), kk.ravel()], axis=1).astype(np.float64)
        world = vox @ affine[:3, :3].T + affine[:3, 3]
        src = warp.smooth(world) @ inv[:3, :3].T + inv[:3, 3]
        out[i] = ndimage.map_coordinates(source, src.T, order=order, mode="constant",
                                         cval=0).reshape(jj.shape)
    return out


def sample_points(mask: np.ndarray, affine: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` seeded world points (RAS mm) at voxel centres inside ``mask``."""
    idx = np.argwhere(np.asarray(mask) > 0)
    pick = np.random.default_rng(seed).choice(len(idx), size=min(n, len(idx)), replace=False)
    vox = idx[np.sort(pick)].astype(np.float64)
    return vox @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def label_centroids(labels: np.ndarray, affine: np.ndarray) -> dict[int, np.ndarray]:
    """World centroid (RAS mm) of every non-zero label."""
    ids = [int(i) for i in np.unique(labels) if i != 0]
    if not ids:
        return {}
    cents = ndimage.center_of_mass(np.ones(labels.shape, dtype=np.float32), labels, ids)
    a = np.asarray(affine, dtype=np.float64)
    return {i: np.asarray(c) @ a[:3, :3].T + a[:3, 3] for i, c in zip(ids, cents, strict=True)}


def error_summary(errors: np.ndarray) -> dict[str, float]:
    """Median, mean, 95th percentile and maximum of distances (mm)."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    if e.size == 0:
        return {"n": 0, "median": float("nan"), "mean": float("nan"), "p95": float("nan"),
                "max": float("nan")}
    return {"n": int(e.size), "median": float(np.median(e)), "mean": float(e.mean()),
            "p95": float(np.percentile(e, 95)), "max": float(e.max())}


def tissue_dice(warped_labels: np.ndarray, template_labels: np.ndarray,
                labels: dict[str, int]) -> dict[str, float]:
    """Dice per named label between a label map warped onto the template grid and the template's."""
    out = {}
    for name, value in labels.items():
        a, b = np.asarray(warped_labels) == value, np.asarray(template_labels) == value
        denom = int(a.sum()) + int(b.sum())
        out[name] = 2.0 * int((a & b).sum()) / denom if denom else 1.0
    return out


TISSUES = {"CSF": 1, "GM": 2, "WM": 3}  # bids_cl.synth.anatomy's label values


@dataclass
class KnownWarpCase:
    """A template (fixed) and the subject made from it by ``warp``, with the truth to score against."""

    template: object  # nib.Nifti1Image, float32 brain (zero outside the brain)
    template_mask: object  # nib.Nifti1Image, uint8
    template_labels: np.ndarray  # uint8 tissue labels (TISSUES)
    template_lesions: np.ndarray  # int lesion ids
    subject: object  # nib.Nifti1Image, float32 brain
    subject_labels: object  # nib.Nifti1Image, uint8
    subject_lesions: np.ndarray  # int lesion ids on the subject grid
    warp: KnownWarp


def make_case(brain: np.ndarray, mask: np.ndarray, labels: np.ndarray, lesions: np.ndarray,
              affine: np.ndarray, *, seed: int = 0, **warp_options: object) -> KnownWarpCase:
    """Build a ``KnownWarpCase`` from a phantom's brain image, brain mask, tissue labels and lesion ids."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    mask = np.asarray(mask) > 0
    centre = label_centroids(mask.astype(np.uint8), affine)[1]
    warp = make_known_warp(centre, seed=seed, **warp_options)  # type: ignore[arg-type]
    brain = np.where(mask, np.asarray(brain, dtype=np.float32), np.float32(0))
    labels = np.where(mask, np.asarray(labels), 0).astype(np.uint8)
    s_aff = subject_affine(warp, affine)
    return KnownWarpCase(
        template=nib.Nifti1Image(brain, affine), template_mask=nib.Nifti1Image(mask.astype(np.uint8), affine),
        template_labels=labels, template_lesions=np.asarray(lesions),
        subject=nib.Nifti1Image(np.maximum(warp_volume(brain, affine, warp), 0), s_aff),
        subject_labels=nib.Nifti1Image(warp_volume(labels, affine, warp, order=0), s_aff),
        subject_lesions=warp_volume(np.asarray(lesions), affine, warp, order=0),
        warp=warp,
    )


def score_registration(case: KnownWarpCase, result: object, *, points: int = 2000,
                       seed: int = 0) -> dict[str, object]:
    """Errors of a subject -> template registration of ``case`` (a ``RegistrationResult``).

    ``points_mm``: |mapped - true| for ``points`` seeded points inside the subject's brain;
    ``lesions_mm``: mapped subject lesion centroids vs the template lesions' centroids (``lesions_floor_mm``:
    the same with the true map, the part no registration can remove); ``dice``: tissue labels warped onto
    the template grid (``genericLabel``) vs the template's, and ``dice_identity`` without registration.
    """
    from nibabel.processing import resample_from_to

    from bids_cl.preproc.registration import apply_to_template, points_to_template

    s_aff = case.subject.affine
    pts = sample_points(np.asanyarray(case.subject_labels.dataobj) > 0, s_aff, points, seed=seed)
    point_err = np.linalg.norm(points_to_template(pts, result) - case.warp(pts), axis=1)
    subj_c = label_centroids(case.subject_lesions, s_aff)
    tpl_c = label_centroids(case.template_lesions, case.template.affine)
    ids = sorted(set(subj_c) & set(tpl_c))
    lesion_err, floor = np.zeros(0), np.zeros(0)
    if ids:
        xs = np.stack([subj_c[i] for i in ids])
        truth = np.stack([tpl_c[i] for i in ids])
        lesion_err = np.linalg.norm(points_to_template(xs, result) - truth, axis=1)
        floor = np.linalg.norm(case.warp(xs) - truth, axis=1)
    warped = apply_to_template(case.subject_labels, result, case.template, interpolation="genericLabel")
    identity = resample_from_to(case.subject_labels, case.template, order=0)
    return {
        "points_mm": error_summary(point_err),
        "lesions_mm": error_summary(lesion_err),
        "lesions_floor_mm": error_summary(floor),
        "dice": tissue_dice(np.asanyarray(warped.dataobj), case.template_labels, TISSUES),
        "dice_identity": tissue_dice(np.asanyarray(identity.dataobj), case.template_labels, TISSUES),
    }
