"""Where the packaged demo model lives (package data ``bids_cl/data/models/demo``)."""

from __future__ import annotations

from pathlib import Path

import bids_cl


def demo_model_dir() -> Path:
    # Same folder as bids_cl.engine.registry.packaged_model_dir("demo"); kept import-light here because
    # the training CLI needs it before torch/nnU-Net are loaded.
    return Path(bids_cl.__file__).parent / "data" / "models" / "demo"
