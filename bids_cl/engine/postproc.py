"""Probability -> lesion mask: thresholding, connected components, minimum lesion size (pure numpy).

Labelling and label sizes are bids_cl.utils.components' (the one copy of the connectivity rule).
"""

from __future__ import annotations

import math

import numpy as np

from bids_cl.errors import EXIT_USAGE, BidsClError
from bids_cl.utils.components import DEFAULT_CONNECTIVITY, label_components, label_sizes


def threshold_probability(probability: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Lesion where ``probability > threshold`` (strict, so 0.5 equals nnU-Net's argmax on ties)."""
    if not 0.0 <= float(threshold) < 1.0:
        raise BidsClError(f"threshold must be in [0, 1), not {threshold!r}", EXIT_USAGE)
    return probability > threshold


def min_size_in_voxels(min_lesion_size: int | float | str | tuple[float, str] | None,
                       voxel_volume_ul: float) -> int | None:
    """A minimum lesion size as a voxel count (lesions with fewer voxels are removed).

    Accepts an int (voxels), a string with a unit (``"3uL"``, ``"3 µL"``, ``"3mm3"``, ``"5vox"``; a bare
    number is voxels) or ``(value, "ul"|"voxels")``. A volume becomes the smallest voxel count whose volume
    reaches it: ``ceil(volume / voxel_volume)``.
    """
    if min_lesion_size is None:
        return None
    if isinstance(min_lesion_size, tuple):
        value, unit = float(min_lesion_size[0]), str(min_lesion_size[1]).lower()
    elif isinstance(min_lesion_size, (bool, np.bool_)):
        raise BidsClError(f"min_lesion_size {min_lesion_size!r} is not a size", EXIT_USAGE)
    else:
        from bids_cl.utils.units import parse_min_lesion_size

        parsed = parse_min_lesion_size(min_lesion_size)
        if parsed is None:
            return None
        value, unit = parsed
    if value < 0 or not math.isfinite(value):
        raise BidsClError(f"min_lesion_size must be a positive size, not {min_lesion_size!r}", EXIT_USAGE)
    if unit in ("ul", "µl", "mm3"):
        # A relative tolerance keeps e.g. 3 uL on 1 mm voxels at exactly 3 voxels despite float rounding,
        # including float32 header zooms (0.7 mm is stored as 0.699999988): 1e-6 is far above their error
        # (~2e-7 in a voxel volume) and far below any real difference between two sizes.
        return max(int(math.ceil(value / voxel_volume_ul * (1.0 - 1e-6))), 0)
    return max(int(math.ceil(value - 1e-9)), 0)


def remove_small_components(labels: np.ndarray, n: int, min_voxels: int | None
                            ) -> tuple[np.ndarray, int]:
    """Drop components with fewer than ``min_voxels`` voxels; relabel the rest 1..M keeping their order."""
    if not min_voxels or n == 0:
        return labels, n
    keep = np.concatenate([[False], label_sizes(labels, n) >= min_voxels])
    new_ids = np.zeros(n + 1, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return new_ids[labels], int(keep.sum())


def postprocess(probability: np.ndarray, *, threshold: float = 0.5,
                connectivity: int = DEFAULT_CONNECTIVITY,
                min_voxels: int | None = None) -> tuple[np.ndarray, int]:
    """Threshold, label and size-filter: (lesion labels int32, number of lesions)."""
    return postprocess_mask(threshold_probability(probability, threshold), connectivity=connectivity,
                            min_voxels=min_voxels)


def postprocess_mask(mask: np.ndarray, *, connectivity: int = DEFAULT_CONNECTIVITY,
                     min_voxels: int | None = None) -> tuple[np.ndarray, int]:
    """Label and size-filter an already thresholded mask (``threshold_probability``'s output)."""
    labels, n = label_components(mask, connectivity)
    return remove_small_components(labels, n, min_voxels)
