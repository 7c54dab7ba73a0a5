"""Find, trust-check and load nnU-Net v2 trained-model folders.

A model is an nnU-Net v2 results folder: ``dataset.json``, ``plans.json`` and
``fold_<k>/checkpoint_final.pth`` (or ``checkpoint_best.pth``), possibly nested inside the layout of
``nnUNetv2_export_model_to_zip`` (``Dataset301_X/<trainer>__<plans>__<configuration>/...``), plus an
optional ``bids_cl_model.json``::

    {"name": ..., "description": ..., "warning": ..., "orientation": "RAS",
     "trainer_module": "trainers/"   # folder with custom trainer classes, relative to the model folder
     "configuration": "3d_fullres"}  # which configuration to use when the folder holds several

Trust: checkpoints are pickles. A model given by *name* (registry or installed) is loaded only when its
lock file verifies; a *path* the user names explicitly is loaded as given, but a lock file found there must
still verify (a tampered folder is refused either way).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bids_cl.engine import registry
from bids_cl.engine.lockfile import LOCK_NAME, read_lock_file, sha256_file, verify_lock_file
from bids_cl.errors import EXIT_BAD_DATA, EXIT_MISSING_INPUT, EXIT_USAGE, BidsClError

log = logging.getLogger("bids_cl.engine")

MODEL_JSON = "bids_cl_model.json"
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
DEFAULT_ORIENTATION = "RAS"
# Readers that reorient to RAS themselves: the network was trained on RAS voxel order whatever the files.
_REORIENTING_READERS = {"NibabelIOWithReorient", "SimpleITKIOWithReorient"}
_MAX_SEARCH_DEPTH = 4


# ---------------------------------------------------------------- folder discovery

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


def _find_upwards(start: Path, root: Path, filename: str) -> Path | None:
    """``filename`` in ``start`` or its parents, never above ``root``."""
    current = start.resolve()
    root = root.resolve()
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
        if _find_upwards(model_dir, root, needed) is None:
            raise BidsClError(f"model folder {model_dir} has no {needed}", EXIT_BAD_DATA)
    return model_dir


# ---------------------------------------------------------------- resolution and trust

@dataclass(frozen=True)
class ResolvedModel:
    """Where a model is and why bids_cl trusts it."""

    name: str
    root: Path             # the folder given or installed (plans/dataset are searched up to here)
    model_dir: Path        # the folder with fold_* (root or below)
    trust: str             # "lock" (verified lock file) or "explicit" (a path the user named, no lock)
    lock_dir: Path | None  # the folder holding the verified lock file


_TEMP_DIRS: list[str] = []


def _cleanup_temp_dirs() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup_temp_dirs)


def _unpack_archive(archive: Path) -> Path:
    """Unpack a user's zip once into ``$BIDS_CL_HOME/models/_archives/<sha256>`` (locked there)."""
    from bids_cl.engine.lockfile import write_lock_file

    digest = registry.file_digest(archive)
    cache = registry.models_home() / "_archives" / digest[:16]
    if (cache / LOCK_NAME).is_file():
        return cache
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack.", dir=cache.parent))
    except OSError:
        # Read-only home (container): unpack for this process only.
        staging = Path(tempfile.mkdtemp(prefix="bids_cl_model."))
        _TEMP_DIRS.append(str(staging))
        cache = staging
    registry.safe_extract_zip(archive, staging)
    write_lock_file(staging, source={"archive": archive.name, "archive_sha256": digest})
    if staging != cache:
        try:
            os.replace(staging, cache)
        except OSError:  # another process unpacked the same archive first
            shutil.rmtree(staging, ignore_errors=True)
    return cache


def _verified(root: Path, what: str) -> None:
    problems = verify_lock_file(root)
    if problems:
        shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        raise BidsClError(f"refusing to load {what}: its files do not match the lock file ({shown}). "
                          "Reinstall the model (checkpoints are pickles and are only loaded when intact).",
                          EXIT_BAD_DATA)


def resolve_model(name_or_path: str | os.PathLike[str], *, configuration: str | None = None
                  ) -> ResolvedModel:
    """Locate a model by registry/installed name, folder or export zip, and check that it may be loaded.

    Never downloads: a known but missing model raises ``BidsClError(code 66)`` with the install command.
    """
    text = registry.canonical_name(os.fspath(name_or_path))
    if text == "auto":
        # The default of --model: the published model once installed; never a silent fallback to
        # the demo model, whose output on real scans is meaningless.
        if not registry.is_installed(registry.PUBLISHED_MODEL):
            raise BidsClError(
                "the published model is not installed: "
                f"{registry.install_command(registry.PUBLISHED_MODEL)}; "
                "or pass --model demo to try bids_cl on phantoms", EXIT_MISSING_INPUT)
        text = registry.PUBLISHED_MODEL
    is_name = text in registry.REGISTRY or (
        os.sep not in text and "/" not in text and not text.endswith(".zip")
        and (registry.models_home() / text).is_dir())
    if is_name:
        root = registry.installed_model_dir(text)
        if not (root / LOCK_NAME).is_file():
            if root.is_dir() and text in registry.REGISTRY and registry.REGISTRY[text].packaged:
                raise BidsClError(f"the packaged model '{text}' in {root} has no lock file; "
                                  f"{registry.install_command(text)}", EXIT_MISSING_INPUT)
            raise BidsClError(f"model '{text}' is not installed. Install it with: "
                              f"{registry.install_command(text)}", EXIT_MISSING_INPUT)
        _verified(root, f"model '{text}'")
        return ResolvedModel(text, root, find_model_folder(root, configuration), "lock", root)

    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(registry.REGISTRY)
        raise BidsClError(f"model '{text}' is neither a known model ({known}), an installed model, "
                          "nor an existing folder or zip", EXIT_MISSING_INPUT)
    if path.is_file():
        if not path.name.lower().endswith(".zip"):
            raise BidsClError(f"{path} is a file but not a zip archive of an nnU-Net model",
                              EXIT_BAD_DATA)
        root = _unpack_archive(path.resolve())
        _verified(root, f"the model unpacked from {path}")
        return ResolvedModel(path.stem, root, find_model_folder(root, configuration), "lock", root)
    root = path.resolve()
    model_dir = find_model_folder(root, configuration)
    lock_dir = next((d for d in (root, model_dir) if (d / LOCK_NAME).is_file()), None)
    if lock_dir is not None:
        _verified(lock_dir, f"the model in {lock_dir}")
        return ResolvedModel(root.name, root, model_dir, "lock", lock_dir)
    log.warning("model %s has no lock file: loading it because its path was given explicitly "
                "(checkpoints are pickles: only use model files you trust)", root)
    return ResolvedModel(root.name, root, model_dir, "explicit", None)


# ---------------------------------------------------------------- the model

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BidsClError(f"cannot read {path}: {exc}", EXIT_BAD_DATA) from exc


def _load_checkpoint(path: Path, trusted: bool) -> dict[str, Any]:
    """Load a checkpoint, preferring torch's safe (weights-only) unpickler."""
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError):
        # nnU-Net checkpoints usually hold objects (torch.device, numpy scalars in the training log)
        # that the safe unpickler rejects; full unpickling is allowed only for trusted models.
        if not trusted:
            raise
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt checkpoint can raise almost anything from unpickling
        raise BidsClError(f"cannot load checkpoint {path}: {exc}", EXIT_BAD_DATA) from exc


class CLModel:
    """A loaded-on-demand nnU-Net model plus its bids_cl settings and provenance."""

    def __init__(self, resolved: ResolvedModel) -> None:
        self.resolved = resolved
        self.model_dir = resolved.model_dir
        root = resolved.root
        self.plans = _read_json(_find_upwards(self.model_dir, root, "plans.json"))  # type: ignore[arg-type]
        self.dataset_json = _read_json(
            _find_upwards(self.model_dir, root, "dataset.json"))  # type: ignore[arg-type]
        settings_path = _find_upwards(self.model_dir, root, MODEL_JSON)
        self.settings: dict[str, Any] = _read_json(settings_path) if settings_path else {}
        self.settings_dir = settings_path.parent if settings_path else self.model_dir
        self.checkpoint_files = fold_checkpoints(self.model_dir)
        self._checkpoints: dict[int | str, dict[str, Any]] = {}
        first = self.checkpoint(self.available_folds[0])
        self.trainer_name: str = first.get("trainer_name", "nnUNetTrainer")
        init_args = first.get("init_args") or {}
        self.configuration_name: str = init_args.get("configuration") or self.settings.get(
            "configuration", "3d_fullres")
        axes = first.get("inference_allowed_mirroring_axes")
        self.mirror_axes: tuple[int, ...] | None = tuple(int(a) for a in axes) if axes is not None else None
        self._check_supported()
        self._provenance: dict[str, Any] | None = None

    # -- basic facts
    @property
    def name(self) -> str:
        return str(self.settings.get("name") or self.resolved.name)

    @property
    def available_folds(self) -> list[int | str]:
        return list(self.checkpoint_files)

    @property
    def image_reader_writer(self) -> str:
        return str(self.plans.get("image_reader_writer", "SimpleITKIO"))

    @property
    def orientation(self) -> str:
        """Axis codes (nibabel convention) of the voxel arrays the network was trained on."""
        if self.image_reader_writer in _REORIENTING_READERS:
            return "RAS"
        code = str(self.settings.get("orientation") or DEFAULT_ORIENTATION).upper()
        if len(code) != 3 or sorted(code.replace("L", "R").replace("P", "A").replace("I", "S")) != \
                ["A", "R", "S"]:
            raise BidsClError(f"{MODEL_JSON}: orientation must be three axis codes like RAS or LPS, "
                              f"not {code!r}", EXIT_BAD_DATA)
        return code

    @property
    def warning(self) -> str | None:
        return self.settings.get("warning") or None

    @property
    def tuned_threshold(self) -> float | None:
        """The model's own probability threshold, chosen on its validation split (``bids_cl-train``'s
        tune step, ``postprocessing.threshold`` in bids_cl_model.json); None when it has none."""
        value = self._postprocessing_number("threshold")
        if value is not None and not 0.0 <= value < 1.0:
            raise BidsClError(f"{MODEL_JSON}: postprocessing.threshold must be a number in [0, 1), not "
                              f"{value!r}", EXIT_BAD_DATA)
        return value

    @property
    def tuned_min_lesion_size_ul(self) -> float | None:
        """The model's own minimum lesion size in µL, chosen with its threshold
        (``postprocessing.min_lesion_size_ul``); None when it has none."""
        value = self._postprocessing_number("min_lesion_size_ul")
        if value is not None and not (math.isfinite(value) and value >= 0.0):
            raise BidsClError(f"{MODEL_JSON}: postprocessing.min_lesion_size_ul must be a volume >= 0, not "
                              f"{value!r}", EXIT_BAD_DATA)
        return value

    def _postprocessing_number(self, key: str) -> float | None:
        value = (self.settings.get("postprocessing") or {}).get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BidsClError(f"{MODEL_JSON}: postprocessing.{key} must be a number, not {value!r}",
                              EXIT_BAD_DATA)
        return float(value)

    def _check_supported(self) -> None:
        configs = self.plans.get("configurations", {})
        if self.configuration_name not in configs:
            raise BidsClError(f"plans.json has no configuration {self.configuration_name!r}",
                              EXIT_BAD_DATA)
        if len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))) != 1:
            raise BidsClError("bids_cl models take one input channel (a T1-weighted image)", EXIT_BAD_DATA)
        labels = self.dataset_json.get("labels", {})
        if any(isinstance(v, (list, tuple)) for v in labels.values()):
            raise BidsClError("region-based nnU-Net models are not supported", EXIT_BAD_DATA)

    # -- weights
    def checkpoint(self, fold: int | str) -> dict[str, Any]:
        if fold not in self.checkpoint_files:
            raise BidsClError(f"model {self.name} has no fold {fold!r} (available: "
                              f"{self.available_folds})", EXIT_USAGE)
        if fold not in self._checkpoints:
            self._checkpoints[fold] = _load_checkpoint(self.checkpoint_files[fold], trusted=True)
        return self._checkpoints[fold]

    def parameters(self, folds: list[int | str]) -> list[dict[str, Any]]:
        return [self.checkpoint(f)["network_weights"] for f in folds]

    def select_folds(self, folds: list[int | str] | tuple[int | str, ...] | None) -> list[int | str]:
        if folds is None:
            return self.available_folds
        chosen = []
        for f in folds:
            key: int | str = int(f) if str(f).isdigit() else str(f)
            if key not in self.checkpoint_files:
                raise BidsClError(f"model {self.name} has no fold {f!r} (available: "
                                  f"{self.available_folds})", EXIT_USAGE)
            chosen.append(key)
        if not chosen:
            raise BidsClError("no folds selected", EXIT_USAGE)
        return chosen

    def trainer_class(self) -> tuple[type, str | None]:
        """nnU-Net's trainer class for this checkpoint, and a warning when we had to fall back.

        Only ``build_network_architecture`` is used at inference; a custom trainer that changes the
        loss or the sampling (e.g. a blob-loss trainer) builds the plans' network like nnUNetTrainer.
        """
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        if self.trainer_name == "nnUNetTrainer":
            return nnUNetTrainer, None
        module_dir = self.settings.get("trainer_module")
        old = os.environ.get("nnUNet_extTrainer")
        if module_dir:
            path = (self.settings_dir / module_dir).resolve()
            os.environ["nnUNet_extTrainer"] = os.pathsep.join(p for p in (str(path), old) if p)
        try:
            return recursive_find_trainer_class_by_name(self.trainer_name), None
        except (RuntimeError, ImportError, AssertionError) as exc:
            message = (f"trainer class {self.trainer_name} of model {self.name} is not available "
                       f"({type(exc).__name__}); building the network from plans.json with "
                       "nnUNetTrainer (correct unless the trainer changes the architecture)")
            log.warning(message)
            return nnUNetTrainer, message
        finally:
            if module_dir:
                if old is None:
                    os.environ.pop("nnUNet_extTrainer", None)
                else:
                    os.environ["nnUNet_extTrainer"] = old

    # -- provenance
    def file_hashes(self) -> dict[str, str]:
        """SHA-256 of plans, dataset, settings and checkpoints (from the verified lock when present)."""
        root = self.resolved.lock_dir or self.resolved.root
        lock = read_lock_file(root) if self.resolved.lock_dir else None
        wanted = [_find_upwards(self.model_dir, root, n) for n in ("plans.json", "dataset.json", MODEL_JSON)]
        wanted += list(self.checkpoint_files.values())
        hashes = {}
        for path in wanted:
            if path is None:
                continue
            try:
                rel = path.resolve().relative_to(root.resolve()).as_posix()
            except ValueError:  # plans above a lock kept in the fold folder's parent: not locked
                rel, lock_hash = path.name, None
            else:
                lock_hash = (lock or {}).get("files", {}).get(rel)
            hashes[rel] = lock_hash or sha256_file(path)
        return hashes

    @property
    def provenance(self) -> dict[str, Any]:
        if self._provenance is None:
            self._provenance = self._make_provenance()
        return dict(self._provenance)

    def _make_provenance(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            nnunet_version = version("nnunetv2")
        except PackageNotFoundError:
            nnunet_version = None
        spec = registry.REGISTRY.get(self.resolved.name)
        source = registry.lock_source(self.resolved.lock_dir) if self.resolved.lock_dir else {}
        config = self.plans["configurations"][self.configuration_name]
        reader = self.image_reader_writer
        doi = self.settings.get("doi") or source.get("doi") or (spec.doi if spec else None)
        return {
            "name": self.name,
            "description": self.settings.get("description") or (spec.description if spec else None),
            "version": self.settings.get("version") or source.get("record_version"),
            "warning": self.warning,
            "doi": doi,
            "source": source or ({"path": str(self.resolved.root)}),
            "license": source.get("license") or self.settings.get("license"),
            "citation": spec.citation if spec else self.settings.get("citation"),
            "path": str(self.model_dir),
            "trust": self.resolved.trust,
            "dataset": self.plans.get("dataset_name"),
            "plans": self.plans.get("plans_name"),
            "configuration": self.configuration_name,
            "trainer": self.trainer_name,
            "folds": [f for f in self.available_folds],
            "checkpoints": {str(f): p.name for f, p in self.checkpoint_files.items()},
            "patch_size": config.get("patch_size"),
            # nnU-Net keeps spacing in its array axis order (z, y, x for SimpleITK/nibabel readers).
            "spacing": config.get("spacing"),
            "spacing_axis_order": "reader (z, y, x)",
            "channel_names": self.dataset_json.get("channel_names"),
            "labels": self.dataset_json.get("labels"),
            "normalization": config.get("normalization_schemes"),
            "image_reader_writer": reader,
            "orientation": self.orientation,
            "mirror_axes": list(self.mirror_axes) if self.mirror_axes is not None else None,
            "files": self.file_hashes(),
            "nnunet_version": nnunet_version,
        }


def load_model(name_or_path: str | os.PathLike[str] | CLModel, *, configuration: str | None = None
               ) -> CLModel:
    """A ``CLModel`` for ``"demo"``, an installed/registry name, a model folder or an export zip."""
    if isinstance(name_or_path, CLModel):
        return name_or_path
    return CLModel(resolve_model(name_or_path, configuration=configuration))
