"""The one rule for choosing a torch device (segmentation, skull stripping, training).

``"auto"``: the first CUDA GPU when torch sees one, else the CPU. An explicit ``"cuda"``/``"cuda:N"`` on a
machine without a visible GPU is a missing resource (exit 66), not a reason to fall back silently; a name
torch does not know is a usage error (64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bids_cl.errors import EXIT_MISSING_INPUT, EXIT_USAGE, BidsClError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` for ``device`` ("auto", "cpu", "cuda", "cuda:1", or a ``torch.device``)."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif str(device) == "auto":
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(str(device))
        except RuntimeError as exc:
            raise BidsClError(f"unknown device {device!r}: {exc}", EXIT_USAGE) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BidsClError(f"device {str(device)!r} was requested but no CUDA device is visible "
                          "(containers need --nv / --gpus)", EXIT_MISSING_INPUT)
    return dev
