"""bids_cl.evaluation: lesion-wise metrics (paper definitions) and the bids_cl-evaluate command.

The metrics are pure functions on binary numpy masks (`bids_cl.evaluation.metrics`); the command
(`bids_cl.evaluation.cli:main`) pairs predicted and reference masks and writes tables and a summary.
"""

from bids_cl.evaluation.metrics import (
    LesionCounts,
    LesionMatch,
    VoxelCounts,
    evaluate_masks,
    lesionwise_metrics,
    match_lesions,
    voxel_counts,
)
from bids_cl.utils.components import label_components

__all__ = [
    "LesionCounts",
    "LesionMatch",
    "VoxelCounts",
    "evaluate_masks",
    "label_components",
    "lesionwise_metrics",
    "match_lesions",
    "voxel_counts",
]
