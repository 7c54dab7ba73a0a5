"""Measurements on generated phantoms (used by the tests and benchmarks/synth.py)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from bids_cl.synth.anatomy import GM, WM


def lesion_box(dseg: np.ndarray, lesion_id: int, pad: int = 4) -> tuple[slice, ...]:
    """Bounding box of one lesion grown by ``pad`` voxels."""
    ijk = np.argwhere(dseg == lesion_id)
    lo = np.maximum(ijk.min(axis=0) - pad, 0)
    hi = np.minimum(ijk.max(axis=0) + pad + 1, dseg.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def lesion_contrast(
    image: np.ndarray,
    dseg: np.ndarray,
    labels: np.ndarray,
    lesion_id: int,
    lesion_fraction: np.ndarray | None = None,
    shell: int = 3,
) -> float:
    """Relative intensity of a lesion against the same tissue around it (negative = darker).

    The surround is a ``shell``-voxel band around the lesion, outside every lesion (and outside the
    soft edge of any lesion when ``lesion_fraction`` is given). GM lesion voxels are compared with
    GM surround voxels and WM with WM (a leukocortical lesion has both), weighted by voxel count;
    ``labels`` holds the dominant healthy tissue (anatomy.GM / WM). NaN when nothing comparable.
    """
    box = lesion_box(dseg, lesion_id, pad=shell + 1)
    img, lab = image[box], labels[box]
    own = dseg[box] == lesion_id
    busy = dseg[box] > 0
    if lesion_fraction is not None:
        busy |= lesion_fraction[box] > 0.02
    around_all = ndi.binary_dilation(own, iterations=shell) & ~ndi.binary_dilation(busy)
    num = den = 0.0
    for tissue in (GM, WM):
        inside, around = own & (lab == tissue), around_all & (lab == tissue)
        if inside.sum() >= 1 and around.sum() >= 3:
            num += inside.sum() * (img[inside].mean() / img[around].mean() - 1.0)
            den += inside.sum()
    return num / den if den else float("nan")


def contrast_table(subjects) -> dict[tuple[str, str], list[float]]:
    """(sequence, lesion type) -> contrasts of every labelled lesion in the target images."""
    out: dict[tuple[str, str], list[float]] = {}
    for subject in subjects:
        for ph in subject.images:
            for row in ph.present_rows:
                value = lesion_contrast(ph.target_image, ph.truth.dseg, ph.labels,
                                        row["lesion_id"], ph.truth.fraction)
                out.setdefault((ph.sequence, row["type"]), []).append(value)
    return out
