"""The layout of an nnU-Net v2 trained-model folder, and finding one inside a folder tree.

A model is ``dataset.json``, ``plans.json`` and ``fold_<k>/checkpoint_final.pth`` (or
``checkpoint_best.pth``), possibly nested inside the layout of ``nnUNetv2_export_model_to_zip``
(``Dataset301_X/<trainer>__<plans>__<configuration>/...``), plus an optional ``bids_cl_model.json``::

    {"name": ..., "description": ..., "warning": ..., "orientation": "RAS",
     "trainer_module": "trainers/"   # folder with custom trainer classes, relative to the model folder
     "configuration": "3d_fullres"}  # which configuration to use when the folder holds several

Pure path logic: nothing here reads a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from bids_cl.errors import EXIT_BAD_DATA, BidsClError

MODEL_JSON = "bids_cl_model.json"
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
_MAX_SEARCH_DEPTH = 4


def fold_checkpoints(model_dir: Path) -> dict[int | str, Path]:
    """``{fold: checkpoint}`` for every ``fold_*`` with a final (preferred) or best checkpoint."""
    found: dict[int | str, Path] = {}
    for sub in sorted(Path(model_dir).glob("fold_*")):
        if not sub.is_dir():
            continue
        label = sub.name[len("fold_"):]
        fold: int | str = int(label) if label.isdigit() else label
        for name in CHECKPOINT_NAMES:
            if (sub / name).is_file():
                found[fold] = sub / name
                break
    return dict(sorted(found.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]).zfill(4))))


def find_upwards(start: Path, root: Path, filename: str) -> Path | None:
    """``filename`` in ``start`` or its parents, never above ``root``."""
    current = Path(start).resolve()
    root = Path(root).resolve()
    while True:
        if (current / filename).is_file():
            return current / filename
        if current == root or root not in current.parents:
            return None
        current = current.parent


def find_model_folder(root: Path, configuration: str | None = None) -> Path:
    """The folder under ``root`` that holds ``fold_*`` checkpoints (``root`` itself included).

    With several candidates (an export zip with 2d and 3d configurations) the one whose name ends in
    ``__<configuration>`` wins, ``3d_fullres`` by default.
    """
    root = Path(root)
    candidates = []
    for current, dirs, _files in os.walk(root):
        depth = len(Path(current).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < _MAX_SEARCH_DEPTH)
        if fold_checkpoints(Path(current)):
            candidates.append(Path(current))
            dirs[:] = []  # fold folders are not models themselves
    if not candidates:
        raise BidsClError(f"no nnU-Net model in {root}: expected fold_<k>/checkpoint_final.pth "
                          "(or checkpoint_best.pth) with plans.json and dataset.json", EXIT_BAD_DATA)
    if len(candidates) > 1:
        wanted = configuration or "3d_fullres"
        chosen = [c for c in candidates if c.name.endswith(f"__{wanted}") or c.name == wanted]
        if len(chosen) != 1:
            raise BidsClError(f"{root} holds several models ({', '.join(str(c) for c in candidates)}); "
                              "name the one to use (its folder)", EXIT_BAD_DATA)
        candidates = chosen
    model_dir = candidates[0]
    for needed in ("plans.json", "dataset.json"):
        if find_upwards(model_dir, root, needed) is None:
            raise BidsClError(f"model folder {model_dir} has no {needed}", EXIT_BAD_DATA)
    return model_dir


def locks_between(root: Path, model_dir: Path, lock_name: str) -> list[Path]:
    """Folders from ``model_dir`` up to ``root`` (both included) that hold a ``lock_name`` file,
    nearest to the checkpoints first."""
    found = []
    current = Path(model_dir).resolve()
    top = Path(root).resolve()
    while True:
        if (current / lock_name).is_file():
            found.append(current)
        if current == top or top not in current.parents:
            return found
        current = current.parent
