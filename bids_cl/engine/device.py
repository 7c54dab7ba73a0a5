"""The one rule for choosing a torch device (segmentation, skull stripping, training).

``"auto"``: the first CUDA GPU when torch sees one, else the CPU. An explicit ``"cuda"``/``"cuda:N"`` on a
machine without a visible GPU is a missing resource (exit 66), not a reason to fall back silently; a name
torch does not know is a usage error (64).

The check asks NVML, not the CUDA runtime: the runtime's check (``torch.cuda.is_available()``'s default)
initialises CUDA in the asking process, and every process forked from it afterwards (Nipype's MultiProc
workers, the run's segmentation worker) then fails on its first CUDA call ("Cannot re-initialize CUDA in
forked subprocess"). The runner asks before it forks them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from bids_cl.errors import EXIT_MISSING_INPUT, EXIT_USAGE, BidsClError

if TYPE_CHECKING:
    import torch


# torch reads it at each is_available() call: NVML's device count, falling back to the runtime's only
# where NVML cannot be loaded (no NVIDIA driver: then there is no GPU to poison either).
_FORK_SAFE_CUDA_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU, asked without initialising CUDA in this process (fork-safe)."""
    import torch

    os.environ.setdefault(_FORK_SAFE_CUDA_CHECK, "1")
    return torch.cuda.is_available()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` for ``device`` ("auto", "cpu", "cuda", "cuda:1", or a ``torch.device``)."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif str(device) == "auto":
        dev = torch.device("cuda") if cuda_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(str(device))
        except RuntimeError as exc:
            raise BidsClError(f"unknown device {device!r}: {exc}", EXIT_USAGE) from exc
    if dev.type == "cuda" and not cuda_available():
        raise BidsClError(f"device {str(device)!r} was requested but no CUDA device is visible "
                          "(containers need --nv / --gpus)", EXIT_MISSING_INPUT)
    return dev
