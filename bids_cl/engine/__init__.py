"""bids_cl.engine: nnU-Net v2 cortical lesion segmentation (models, inference, post-processing, tables).

Public API (docs/dev/architecture.md, "Engine API")::

    model = load_model("demo" | "/path/to/model_folder" | "/path/to/export.zip")
    res = segment(image, model, device="auto", folds=None, tta=None, threshold=None,
                  min_lesion_size=None, connectivity=26, nthreads=None, brain_mask=None, fast=True)

Heavy imports (torch, nnU-Net) happen on first use, so ``import bids_cl.engine`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bids_cl.engine.lockfile import LOCK_NAME, verify_lock_file, write_lock_file

if TYPE_CHECKING:
    from bids_cl.engine.models import CLModel, load_model, resolve_model
    from bids_cl.engine.segmentation import CLSegmenter, SegmentationResult, segment

__all__ = [
    "LOCK_NAME", "CLModel", "CLSegmenter", "SegmentationResult", "load_model", "resolve_model",
    "segment", "verify_lock_file", "write_lock_file",
]

_LAZY = {
    "CLModel": "bids_cl.engine.models",
    "load_model": "bids_cl.engine.models",
    "resolve_model": "bids_cl.engine.models",
    "CLSegmenter": "bids_cl.engine.segmentation",
    "SegmentationResult": "bids_cl.engine.segmentation",
    "segment": "bids_cl.engine.segmentation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bids_cl.engine' has no attribute {name!r}")
