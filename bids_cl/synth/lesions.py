"""MS lesions of the phantoms: types, sizes, placement in template space, rasterisation, truth.

A lesion is a union of 1-3 soft ellipsoids (``Blob``) in template mm, restricted to the tissue its
type allows. Cortical lesions (CL, the target of bids_cl):

* ``leukocortical`` -- straddles the grey/white-matter boundary of the cortex;
* ``intracortical`` -- inside the cortical grey matter only;
* ``juxtacortical`` -- in white matter, touching the cortex.

White-matter lesions are distractors, labelled WML and never CL:

* ``periventricular`` -- white matter touching the lateral ventricles;
* ``deep_wm`` -- white matter away from both cortex and ventricles.

The same rule (``allowed_tissue``) restricts a lesion on the template grid (at placement) and on
every image grid (when the truth is drawn), so the truth of every image obeys its type.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
from scipy import ndimage as ndi

from bids_cl.synth.anatomy import CORTEX, GM, VENTRICLE, WM, TemplateAnatomy

#: lesion type -> truth label
LESION_TYPES: dict[str, str] = {
    "leukocortical": "CL",
    "intracortical": "CL",
    "juxtacortical": "CL",
    "periventricular": "WML",
    "deep_wm": "WML",
}
#: type -> small integer used in per-voxel lookup tables (0 = no lesion)
TYPE_CODES: dict[str, int] = {name: i + 1 for i, name in enumerate(LESION_TYPES)}
CL_TYPES = tuple(t for t, lab in LESION_TYPES.items() if lab == "CL")
WML_TYPES = tuple(t for t, lab in LESION_TYPES.items() if lab == "WML")

#: realistic volume ranges at 1 mm (uL): cortical lesions ~10-300 uL, WM lesions larger
VOLUME_RANGE_UL: dict[str, tuple[float, float]] = {
    "intracortical": (10.0, 100.0),
    "leukocortical": (20.0, 300.0),
    "juxtacortical": (15.0, 250.0),
    "periventricular": (40.0, 1500.0),
    "deep_wm": (15.0, 600.0),
}
#: share of a blob left after the tissue restriction (first guess of the blob size; measured after)
_KEEP = {"intracortical": 0.3, "leukocortical": 0.6, "juxtacortical": 0.7,
         "periventricular": 0.75, "deep_wm": 1.0}
CL_MIX = {"leukocortical": 0.5, "intracortical": 0.25, "juxtacortical": 0.25}
WML_MIX = {"periventricular": 0.5, "deep_wm": 0.5}

STATUS_BASELINE, STATUS_NEW, STATUS_ENLARGING, STATUS_STABLE = (
    "baseline", "new", "enlarging", "stable",
)
STATUS_SHRINKING, STATUS_DISAPPEARED = "shrinking", "disappeared"
#: every status of the truth tables, in course order
STATUSES = (STATUS_BASELINE, STATUS_NEW, STATUS_ENLARGING, STATUS_STABLE, STATUS_SHRINKING,
            STATUS_DISAPPEARED)
#: linear size factor of a shrinking lesion (volume x0.34-0.61)
SHRINK_RANGE = (0.7, 0.85)
#: a shrinking lesion keeps at least this many times ``LesionScale.min_voxels`` on the template grid
#: at its shrunken size, so that it stays in every image (it shrinks, it does not vanish)
SHRUNK_MIN_FACTOR = 3


@dataclass(frozen=True)
class LesionScale:
    """How lesions are drawn at one phantom size (see docs/phantoms.md, "tiny scaling")."""

    template_resolution: int  # mm of the template grid the lesions are drawn on
    volume_factor_cl: float  # multiplies VOLUME_RANGE_UL of cortical lesions
    volume_factor_wml: float  # ... of white-matter lesions
    edge_mm: float  # width of the soft edge
    margin_mm: float  # free space kept between two lesions, so they never merge in any image
    min_voxels: int  # a lesion smaller than this in an image is left out of that image
    max_cl: int
    max_wml: int


SCALES: dict[str, LesionScale] = {
    # 1 mm template, lesions at their real size
    "full": LesionScale(1, 1.0, 1.0, 0.6, 3.0, 4, 20, 15),
    # 2 mm grid: cortical lesions get 8x the volume (2x the diameter), so that the smallest is
    # ~10 voxels of 8 uL and a tiny network still sees it; white-matter lesions, only distractors,
    # 4x (they are large already); fewer lesions fit in the brain at that size
    "tiny": LesionScale(2, 8.0, 4.0, 1.2, 6.0, 5, 10, 8),
}


@dataclass(frozen=True)
class Blob:
    centre: np.ndarray  # template mm
    radii: np.ndarray  # mm, along the rotated axes
    rotation: np.ndarray  # 3x3, columns = blob axes


@dataclass(frozen=True)
class Lesion:
    """One lesion of one subject, followed over sessions (1-based session indices)."""

    lesion_id: int
    type: str
    blobs: tuple[Blob, ...]  # at onset size; blobs[0] is the core
    onset: int = 1
    enlarge_at: int | None = None
    growth: float = 1.0  # linear size factor from ``enlarge_at`` on
    target_ul: float = field(default=0.0, compare=False)
    shrink_at: int | None = None
    shrink: float = 1.0  # linear size factor from ``shrink_at`` on
    disappear_at: int | None = None  # first session without the lesion

    @property
    def label(self) -> str:
        return LESION_TYPES[self.type]

    @property
    def sizes(self) -> tuple[float, ...]:
        """Every linear size the lesion takes over its course (relative to onset), ascending."""
        return tuple(sorted({1.0, self.growth, self.shrink}))

    def present_at(self, session: int) -> bool:
        """Whether the lesion exists at a session (after onset, before it disappears)."""
        return session >= self.onset and (self.disappear_at is None or session < self.disappear_at)

    def scale_at(self, session: int) -> float | None:
        """Linear size at a session relative to onset, None before onset and once disappeared."""
        if not self.present_at(session):
            return None
        if self.enlarge_at is not None and session >= self.enlarge_at:
            return self.growth
        if self.shrink_at is not None and session >= self.shrink_at:
            return self.shrink
        return 1.0

    def status_at(self, session: int) -> str | None:
        """Course since the previous session; ``disappeared`` only at ``disappear_at``, None
        before onset and after that."""
        if session == self.disappear_at:
            return STATUS_DISAPPEARED
        if not self.present_at(session):
            return None
        if session == self.onset:
            return STATUS_BASELINE if session == 1 else STATUS_NEW
        if self.enlarge_at == session:
            return STATUS_ENLARGING
        if self.shrink_at == session:
            return STATUS_SHRINKING
        return STATUS_STABLE

    def scaled_blobs(self, scale: float) -> list[Blob]:
        core = self.blobs[0].centre
        return [
            Blob(core + scale * (b.centre - core), b.radii * scale, b.rotation) for b in self.blobs
        ]


# ----------------------------------------------------------------------------------------------
# pure numerics


def soft_blobs(points: np.ndarray, blobs: Sequence[Blob], edge_mm: float) -> np.ndarray:
    """Soft union of ellipsoids at points (n, 3) in mm: ~1 inside, ~0 outside, 0.5 on the surface.

    The transition is a logistic of the approximate distance to the surface, ``edge_mm`` wide
    (10-90%): lesions have no sharp border in MRI.
    """
    best = np.full(points.shape[0], -np.inf)
    for b in blobs:
        local = (points - b.centre) @ b.rotation / b.radii
        rho = np.sqrt((local**2).sum(axis=1))
        # distance to the surface along the ray, in mm of the mean radius
        dist = (1.0 - rho) * float(np.exp(np.log(b.radii).mean()))
        best = np.maximum(best, dist)
    return 1.0 / (1.0 + np.exp(-best * (4.4 / edge_mm)))


def allowed_tissue(type_codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per voxel, whether the lesion type coded there may occupy the voxel's dominant tissue."""
    gm, wm = labels == GM, labels == WM
    allowed = np.zeros(labels.shape, bool)
    for name, code in TYPE_CODES.items():
        sel = type_codes == code
        if not sel.any():
            continue
        if name == "intracortical":
            ok = gm
        elif name == "leukocortical":
            ok = gm | wm
        else:  # juxtacortical and both WM-lesion types live in white matter
            ok = wm
        allowed |= sel & ok
    return allowed


def type_rules_hold(
    lesion_type: str,
    mask: np.ndarray,
    labels: np.ndarray,
    regions: np.ndarray,
    clearance: int = 1,
) -> bool:
    """The geometric rule of a lesion type on a crop (mask, labels, regions of the same crop).

    "Touching" means a 26-neighbour; a deep lesion must keep ``clearance`` voxels from grey
    matter and ventricles (more on the fine template grid, so it still holds after resampling).
    """
    n = int(mask.sum())
    if n == 0:
        return False
    cube = np.ones((3, 3, 3), bool)
    near = ndi.binary_dilation(mask, structure=cube) & ~mask
    if lesion_type == "deep_wm":
        near = ndi.binary_dilation(mask, structure=cube, iterations=clearance) & ~mask
    touches_gm = bool((near & (labels == GM)).any())
    touches_ventricle = bool((near & ((regions & VENTRICLE) > 0)).any())
    if lesion_type == "leukocortical":
        n_gm, n_wm = int((mask & (labels == GM)).sum()), int((mask & (labels == WM)).sum())
        return n_gm >= max(1, 0.15 * n) and n_wm >= max(1, 0.15 * n)
    if lesion_type == "intracortical":
        return bool((labels[mask] == GM).all()) and not touches_ventricle
    if lesion_type == "juxtacortical":
        return touches_gm
    if lesion_type == "periventricular":
        return touches_ventricle
    if lesion_type == "deep_wm":
        return not touches_gm and not touches_ventricle
    raise ValueError(f"unknown lesion type {lesion_type!r}")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component (the connectivity the evaluation uses)."""
    comps, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(comps.ravel())[1:]
    return comps == (int(np.argmax(sizes)) + 1)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random 3D rotation (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_shape(
    rng: np.random.Generator, centre: np.ndarray, radius: float, elongation: float
) -> tuple[Blob, ...]:
    """A core ellipsoid of mean radius ``radius`` plus up to two smaller lobes (irregular outline)."""
    ratios = np.exp(rng.normal(0.0, elongation, 3))
    ratios /= np.exp(np.log(ratios).mean())
    rot = random_rotation(rng)
    blobs = [Blob(centre, radius * ratios, rot)]
    for _ in range(int(rng.integers(0, 3))):
        offset = rot @ (rng.uniform(-0.6, 0.6, 3) * radius * ratios)
        blobs.append(Blob(centre + offset, radius * rng.uniform(0.45, 0.75, 3), random_rotation(rng)))
    return tuple(blobs)


# ----------------------------------------------------------------------------------------------
# template-space placement


@dataclass(frozen=True)
class _Pools:
    """Candidate lesion centres (template mm) per type, from the 2 mm template."""

    centres: dict[str, np.ndarray]


@functools.lru_cache(maxsize=1)
def _placement_pools() -> _Pools:
    # distances on the 2 mm grid are plenty for choosing centres and 8x cheaper than at 1 mm
    from bids_cl.synth.anatomy import load_template_anatomy

    anat = load_template_anatomy(2)
    res = anat.resolution
    labels, regions = anat.labels, anat.regions
    cortex = (regions & CORTEX) > 0
    ventricles = (regions & VENTRICLE) > 0

    def dist(mask: np.ndarray) -> np.ndarray:
        return ndi.distance_transform_edt(~mask, sampling=res)

    d_wm, d_cortex = dist(labels == WM), dist(cortex)
    d_gm, d_vent = dist(labels == GM), dist(ventricles)
    wm = labels == WM
    pools = {
        "intracortical": cortex & (d_wm >= 2 * res - 0.1),
        "leukocortical": cortex & (d_wm <= res + 0.1),
        "juxtacortical": wm & (d_cortex >= res) & (d_cortex <= 2 * res + 0.1),
        "periventricular": wm & (d_vent > 0) & (d_vent <= 2 * res + 0.1),
        "deep_wm": wm & (d_gm >= 8.0) & (d_vent >= 8.0),
    }
    centres = {}
    for name, mask in pools.items():
        ijk = np.argwhere(mask).astype(float)
        centres[name] = ijk @ anat.affine[:3, :3].T + anat.affine[:3, 3]
    return _Pools(centres)


def _crop_box(anat: TemplateAnatomy, blobs: Sequence[Blob], pad_mm: float) -> tuple[slice, ...]:
    lo = np.min([b.centre - b.radii.max() for b in blobs], axis=0) - pad_mm
    hi = np.max([b.centre + b.radii.max() for b in blobs], axis=0) + pad_mm
    inv = np.linalg.inv(anat.affine)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    vox = corners @ inv[:3, :3].T + inv[:3, 3]
    a = np.clip(np.floor(vox.min(axis=0)).astype(int), 0, np.array(anat.shape))
    b = np.clip(np.ceil(vox.max(axis=0)).astype(int) + 1, 0, np.array(anat.shape))
    return tuple(slice(int(i), int(j)) for i, j in zip(a, b, strict=True))


def _grid_points(anat: TemplateAnatomy, box: tuple[slice, ...]) -> np.ndarray:
    ijk = np.indices(tuple(s.stop - s.start for s in box), dtype=float).reshape(3, -1).T
    ijk += np.array([s.start for s in box], float)
    return ijk @ anat.affine[:3, :3].T + anat.affine[:3, 3]


def rasterize(
    anat: TemplateAnatomy, blobs: Sequence[Blob], edge_mm: float, pad_mm: float = 0.0
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Soft field of one lesion on a crop of the template grid: (crop, values)."""
    box = _crop_box(anat, blobs, pad_mm + 2.0 * edge_mm + anat.resolution)
    shape = tuple(s.stop - s.start for s in box)
    if min(shape) <= 0:
        return box, np.zeros(shape, np.float32)
    values = soft_blobs(_grid_points(anat, box), blobs, edge_mm).reshape(shape)
    return box, values.astype(np.float32)


def _constrained(anat: TemplateAnatomy, lesion_type: str, box, soft: np.ndarray) -> np.ndarray:
    codes = np.full(soft.shape, TYPE_CODES[lesion_type], np.uint8)
    return largest_component((soft > 0.5) & allowed_tissue(codes, anat.labels[box]))


class PlannedLesion(NamedTuple):
    """One lesion of a participant's plan: its type and course (1-based sessions)."""

    type: str
    onset: int
    enlarge_at: int | None = None
    shrink_at: int | None = None
    disappear_at: int | None = None


def place_lesions(
    rng: np.random.Generator,
    anat: TemplateAnatomy,
    scale: LesionScale,
    plan: Sequence[tuple],
    max_tries: int = 40,
) -> list[Lesion]:
    """Place the lesions of a plan (``PlannedLesion`` or (type, onset, enlarge session)) in
    template space.

    Each candidate is drawn at its largest size, restricted to its tissue, checked against its
    type's rule and volume range at onset, its rule at every other size of its course (a shrinking
    lesion also keeps ``SHRUNK_MIN_FACTOR`` x ``min_voxels``), and kept only if it stays
    ``margin_mm`` away from every lesion placed before. Ids follow the plan order (1..N); plans
    that find no room are dropped, so fewer lesions than planned may come back.
    """
    pools = _placement_pools()
    reserved = np.zeros(anat.shape, bool)
    margin = max(1, int(round(scale.margin_mm / anat.resolution)))
    lesions: list[Lesion] = []
    voxel_ul = anat.resolution**3
    for entry in plan:
        lesion_type, onset, enlarge_at, shrink_at, disappear_at = PlannedLesion(*entry)
        factor = scale.volume_factor_cl if LESION_TYPES[lesion_type] == "CL" else scale.volume_factor_wml
        vmin, vmax = (v * factor for v in VOLUME_RANGE_UL[lesion_type])
        candidates = pools.centres[lesion_type]
        if len(candidates) == 0:
            continue
        for _ in range(max_tries):
            target = float(np.exp(rng.uniform(np.log(vmin), np.log(vmax))))
            growth = float(rng.uniform(1.2, 1.4)) if enlarge_at is not None else 1.0
            # drawn only for shrinking lesions, so every other course draws what it drew before
            shrink = float(rng.uniform(*SHRINK_RANGE)) if shrink_at is not None else 1.0
            centre = candidates[rng.integers(len(candidates))] + rng.uniform(-1.0, 1.0, 3)
            radius = (3.0 * target / _KEEP[lesion_type] / (4.0 * np.pi)) ** (1.0 / 3.0)
            elong = 0.35 if lesion_type in ("intracortical", "periventricular") else 0.2
            blobs = random_shape(rng, centre, radius, elong)
            candidate = Lesion(0, lesion_type, blobs, onset, enlarge_at, growth, target,
                               shrink_at=shrink_at, shrink=shrink, disappear_at=disappear_at)
            ok, box, support = _check_candidate(anat, candidate, scale, vmin, vmax, voxel_ul)
            if not ok or (reserved[box] & support).any():
                continue
            # reserve the support plus the margin: the next lesion's support may not enter it
            big = _pad_box(box, margin, anat.shape)
            reserved[big] |= ndi.binary_dilation(_embed(support, box, big), iterations=margin)
            lesions.append(replace(candidate, lesion_id=len(lesions) + 1))
            break
    return lesions


def _check_candidate(anat, lesion: Lesion, scale: LesionScale, vmin, vmax, voxel_ul):
    """Tissue rule and volume of a candidate at onset and at final size (template grid)."""
    clearance = max(1, int(round(2.0 / anat.resolution)))
    final_support, final_box = None, None
    for s in lesion.sizes:
        box, soft = rasterize(anat, lesion.scaled_blobs(s), scale.edge_mm, pad_mm=2.0 * scale.margin_mm)
        if soft.size == 0:
            return False, None, None
        mask = _constrained(anat, lesion.type, box, soft)
        vol = mask.sum() * voxel_ul
        if s == 1.0 and not (vmin <= vol <= 1.5 * vmax):
            return False, None, None
        if s < 1.0 and vol < SHRUNK_MIN_FACTOR * scale.min_voxels * voxel_ul:
            return False, None, None
        if not type_rules_hold(lesion.type, mask, anat.labels[box], anat.regions[box], clearance):
            return False, None, None
        # the whole soft support (not just the mask) must stay clear of other lesions
        final_support, final_box = (soft > 0.02), box
    return True, final_box, final_support


def _pad_box(box, pad: int, shape) -> tuple[slice, ...]:
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box, shape, strict=True))


def _embed(values: np.ndarray, box, big) -> np.ndarray:
    """Place a crop (computed on ``box``) into the larger ``big`` crop, zero elsewhere."""
    out = np.zeros(tuple(s.stop - s.start for s in big), values.dtype)
    inner = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(box, big, strict=True))
    out[inner] = values
    return out


def lesion_maps(
    anat: TemplateAnatomy, lesions: Sequence[Lesion], session: int, edge_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Soft lesion field (float32) and lesion-id map (int16) on the template grid for a session.

    The id map covers each lesion's whole soft support so that nearest-neighbour resampling gives
    every image voxel of the lesion its id.
    """
    soft = np.zeros(anat.shape, np.float32)
    ids = np.zeros(anat.shape, np.int16)
    for lesion in lesions:
        s = lesion.scale_at(session)
        if s is None:
            continue
        box, values = rasterize(anat, lesion.scaled_blobs(s), edge_mm)
        support = values > 0.02
        ids[box][support] = lesion.lesion_id
        soft[box] = np.maximum(soft[box], values)
    return soft, ids


# ----------------------------------------------------------------------------------------------
# image-grid truth


@dataclass
class ImageTruth:
    """Truth of one image: lesion fraction (drives contrast), dseg (ids), kept ids."""

    fraction: np.ndarray  # float32 in [0, 1], share of the voxel's parenchyma that is lesion
    dseg: np.ndarray  # int16 lesion ids (0 = none)
    kept: list[int]
    dropped: dict[int, str]  # id -> reason (too small, rule broken, merged)


def image_truth(
    soft: np.ndarray,
    ids: np.ndarray,
    labels: np.ndarray,
    regions: np.ndarray,
    lesions: Sequence[Lesion],
    min_voxels: int,
) -> ImageTruth:
    """Turn resampled lesion fields into the truth of one image grid (numpy in, numpy out).

    Each lesion is restricted to its tissue on this grid, reduced to its largest 26-connected
    piece, and kept only if it still has ``min_voxels`` voxels and obeys its type's rule; what is
    not kept is also removed from the lesion fraction, so that image and truth agree.
    """
    by_id = {les.lesion_id: les for les in lesions}
    lut = np.zeros(max(by_id, default=0) + 1, np.uint8)
    for les in lesions:
        lut[les.lesion_id] = TYPE_CODES[les.type]
    fraction = soft * allowed_tissue(lut[ids], labels)
    mask = fraction > 0.5
    dseg = np.where(mask, ids, 0).astype(np.int16)
    kept: list[int] = []
    dropped: dict[int, str] = {}
    objects = ndi.find_objects(ids)
    for lesion_id, box in enumerate(objects, start=1):
        if box is None or lesion_id not in by_id:
            continue
        box = _pad_box(box, 2, ids.shape)
        own = dseg[box] == lesion_id
        keep = largest_component(own) if own.any() else own
        reason = None
        if keep.sum() < min_voxels:
            reason = "too small on this grid"
        elif not type_rules_hold(by_id[lesion_id].type, keep, labels[box], regions[box]):
            reason = "tissue rule broken on this grid"
        if reason is None:
            halo = ndi.binary_dilation(keep, iterations=2)
            spill = (ids[box] == lesion_id) & ~halo
            fraction[box][spill] = 0.0
            dseg[box][own & ~keep] = 0
            kept.append(lesion_id)
        else:
            fraction[box][ids[box] == lesion_id] = 0.0
            dseg[box][own] = 0
            dropped[lesion_id] = reason
    # two lesions touching would merge into one connected component for any evaluator
    comps, n = ndi.label(dseg > 0, structure=np.ones((3, 3, 3), bool))
    for comp_id, box in enumerate(ndi.find_objects(comps), start=1):
        present = np.unique(dseg[box][comps[box] == comp_id])
        if len(present) > 1:
            sizes = {int(i): int((dseg == i).sum()) for i in present}
            for lesion_id in sorted(sizes, key=sizes.get)[:-1]:
                fraction[ids == lesion_id] = 0.0
                dseg[dseg == lesion_id] = 0
                kept.remove(lesion_id)
                dropped[lesion_id] = "touches another lesion on this grid"
    return ImageTruth(fraction.astype(np.float32), dseg, sorted(kept), dropped)
