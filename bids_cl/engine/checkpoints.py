"""Reading checkpoints without running code from them.

A ``.pth``/``.pt`` checkpoint is a pickle: unpickling it fully can call any function the file names.
bids_cl reads every checkpoint (nnU-Net folds, SynthStrip weights, a fine-tune's starting point) with
``torch.load(weights_only=True)`` plus a short allow-list of the harmless types nnU-Net checkpoints
hold besides tensors and containers: numpy scalars (training-log values such as ``_best_ema``) and the
numpy dtypes they are built from. ``torch.device``, ``torch.dtype`` and ``OrderedDict`` are allowed by
torch itself. Anything else is refused with the names of the types the file asks for.

Full unpickling happens only when a caller passes ``allow_code_execution=True``, which the engine does
for one installed model only, when the user installed it with ``bids_cl-models install NAME
--allow-unsafe-unpickling``; it logs a warning every time.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bids_cl.errors import EXIT_BAD_DATA, BidsClError

log = logging.getLogger("bids_cl.engine")

# numpy dtype character codes whose dtype classes may be rebuilt (bool, signed/unsigned ints, floats).
_DTYPE_CODES = "?bhilqBHILQefdg"
# Where numpy 1.x wrote numpy's scalar constructor; numpy 2 moved it to numpy._core.multiarray.
_LEGACY_SCALAR = "numpy.core.multiarray.scalar"


def safe_globals() -> list[Any]:
    """The allow-list: numpy's scalar constructor (under its numpy 1 and 2 names), ``numpy.dtype`` and
    the numeric dtype classes. Each is a constructor of plain numbers; none can call other code."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list[Any] = [scalar, (scalar, _LEGACY_SCALAR), np.dtype]
    allowed += sorted({type(np.dtype(code)) for code in _DTYPE_CODES}, key=lambda t: t.__name__)
    return allowed


@contextmanager
def _allow_list() -> Iterator[None]:
    import torch

    with torch.serialization.safe_globals(safe_globals()):
        yield


def _refused_globals(path: Path) -> list[str]:
    """The globals a checkpoint names beyond the allow-list (read from the pickle, nothing executed)."""
    import torch

    try:
        with _allow_list():
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # an unreadable or legacy-format file: the caller's error says enough
        return []


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu",
                    allow_code_execution: bool = False, what: str = "checkpoint") -> Any:
    """Read a checkpoint with ``weights_only=True`` and the allow-list; ``BidsClError`` (65) otherwise.

    ``allow_code_execution=True`` unpickles fully (it can run code from the file): only for a model the
    user explicitly allowed by name.
    """
    import torch

    path = Path(path)
    if allow_code_execution:
        log.warning("UNSAFE: fully unpickling %s (%s): it can run code; allowed for this model by "
                    "'bids_cl-models install --allow-unsafe-unpickling'", what, path)
        try:
            return torch.load(str(path), map_location=map_location, weights_only=False)
        except Exception as exc:  # unpickling a corrupt file can raise almost anything
            raise BidsClError(f"cannot load {what} {path}: {exc}", EXIT_BAD_DATA) from exc
    try:
        with _allow_list():
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_globals(path)
        if refused:
            raise BidsClError(
                f"refusing {what} {path}: it holds Python objects outside bids_cl's allow-list "
                f"({', '.join(refused[:5])}{' ...' if len(refused) > 5 else ''}); unpickling them could "
                "run code from the file, so it is not loaded", EXIT_BAD_DATA) from exc
        raise BidsClError(f"cannot load {what} {path} safely: {str(exc).splitlines()[-1][:300]}",
                          EXIT_BAD_DATA) from exc
    except Exception as exc:  # truncated or not a checkpoint at all
        raise BidsClError(f"cannot load {what} {path}: {exc}", EXIT_BAD_DATA) from exc


def plain_python(obj: Any) -> Any:
    """``obj`` with numpy scalars replaced by Python numbers (containers rebuilt, tensors untouched), so a
    checkpoint saved from it loads with plain ``weights_only=True``, no allow-list needed."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {k: plain_python(v) for k, v in obj.items()}
        if type(obj) is dict:
            return out
        rebuilt = type(obj)(out)  # an OrderedDict state dict: keep its order and module versions
        if hasattr(obj, "_metadata"):
            rebuilt._metadata = obj._metadata
        return rebuilt
    if isinstance(obj, list):
        return [plain_python(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(plain_python(v) for v in obj)
    return obj
