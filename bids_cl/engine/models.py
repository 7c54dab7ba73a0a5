"""Model loading: resolve a name, folder or zip to a checked model, and load it as a ``CLModel``.

What a model folder looks like is ``bids_cl.engine.store_layout``; which names exist and where they live
is ``bids_cl.engine.registry``; unpacking, checking and installing is ``bids_cl.engine.store``.

Trust: checkpoints are pickles, and are always read with ``weights_only=True`` and an allow-list
(``bids_cl.engine.checkpoints``), whatever their origin. On top of that, a model given by *name*
(registry or installed) is loaded only when its lock file verifies; a *path* the user names (folder or
zip) is loaded as given, but a lock file found there must still verify (a tampered folder is refused
either way). A model without a lock of its own has the trust ``"unverified source"``. Full unpickling
happens only for an installed model the user installed with ``--allow-unsafe-unpickling``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bids_cl.engine import registry, store
from bids_cl.engine.checkpoints import load_checkpoint
from bids_cl.engine.lockfile import LOCK_NAME, read_lock_file, sha256_file
from bids_cl.engine.store_layout import (
    CHECKPOINT_NAMES,
    MODEL_JSON,
    find_model_folder,
    find_upwards,
    fold_checkpoints,
    locks_between,
)
from bids_cl.errors import EXIT_BAD_DATA, EXIT_MISSING_INPUT, EXIT_USAGE, BidsClError

log = logging.getLogger("bids_cl.engine")

__all__ = ["CHECKPOINT_NAMES", "MODEL_JSON", "CLModel", "ResolvedModel", "find_model_folder",
           "fold_checkpoints", "load_model", "resolve_model"]

DEFAULT_ORIENTATION = "RAS"
# Readers that reorient to RAS themselves: the network was trained on RAS voxel order whatever the files.
_REORIENTING_READERS = {"NibabelIOWithReorient", "SimpleITKIOWithReorient"}


# ---------------------------------------------------------------- resolution and trust

@dataclass(frozen=True)
class ResolvedModel:
    """Where a model is and why bids_cl trusts it."""

    name: str
    root: Path             # the folder given or installed (plans/dataset are searched up to here)
    model_dir: Path        # the folder with fold_* (root or below)
    trust: str             # "lock" (a lock of known origin verified) or "unverified source"
    lock_dir: Path | None  # the folder holding the verified lock file
    # Only for an installed model the user allowed with 'bids_cl-models install --allow-unsafe-unpickling'.
    allow_code_execution: bool = False


def _trust(lock_dir: Path | None) -> str:
    return store.UNVERIFIED if store.origin_of(lock_dir) == store.UNVERIFIED else "lock"


def resolve_model(name_or_path: str | os.PathLike[str], *, configuration: str | None = None,
                  verify: bool = True) -> ResolvedModel:
    """Locate a model by registry/installed name, folder or export zip, and check that it may be loaded.

    Never downloads: a known but missing model raises ``BidsClError(code 66)`` with the install command.
    ``verify=False`` skips re-hashing the files against their lock: only for a process whose parent
    verified the same model in this run (the participant workflow verifies once, not once per node).
    Checkpoints are read with the safe loader either way.
    """
    check = store.verified if verify else (lambda folder, what: None)
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
    spec = registry.REGISTRY.get(text)
    if spec is not None and spec.kind != "segmentation":
        raise BidsClError(f"'{text}' ({spec.description}) is not a segmentation model", EXIT_USAGE)
    is_name = spec is not None or (
        os.sep not in text and "/" not in text and not text.endswith(".zip")
        and (registry.models_home() / text).is_dir())
    if is_name:
        root = registry.installed_model_dir(text)
        if not (root / LOCK_NAME).is_file():
            if root.is_dir() and spec is not None and spec.packaged:
                raise BidsClError(f"the packaged model '{text}' in {root} has no lock file; "
                                  f"{registry.install_command(text)}", EXIT_MISSING_INPUT)
            raise BidsClError(f"model '{text}' is not installed. Install it with: "
                              f"{registry.install_command(text)}", EXIT_MISSING_INPUT)
        check(root, f"model '{text}'")
        unsafe = (not (spec is not None and spec.packaged)
                  and store.lock_source(root).get(store.UNSAFE_KEY) is True)
        return ResolvedModel(text, root, find_model_folder(root, configuration), _trust(root), root,
                             allow_code_execution=unsafe)

    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(n for n, s in registry.REGISTRY.items() if s.kind == "segmentation")
        raise BidsClError(f"model '{text}' is neither a known model ({known}), an installed model, "
                          "nor an existing folder or zip", EXIT_MISSING_INPUT)
    if path.is_file():
        if not path.name.lower().endswith(".zip"):
            raise BidsClError(f"{path} is a file but not a zip archive of an nnU-Net model",
                              EXIT_BAD_DATA)
        root = store.unpack_archive(path.resolve())
        check(root, f"the model unpacked from {path}")
        return ResolvedModel(path.stem, root, find_model_folder(root, configuration), _trust(root), root)
    root = path.resolve()
    model_dir = find_model_folder(root, configuration)
    locks = locks_between(root, model_dir, LOCK_NAME)
    for folder in locks:
        check(folder, f"the model in {folder}")
    if locks:
        return ResolvedModel(root.name, root, model_dir, _trust(locks[0]), locks[0])
    log.warning("model %s has no lock file (unverified source): its checkpoints are read with the "
                "safe loader only", root)
    return ResolvedModel(root.name, root, model_dir, store.UNVERIFIED, None)


# ---------------------------------------------------------------- the model

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BidsClError(f"cannot read {path}: {exc}", EXIT_BAD_DATA) from exc


class CLModel:
    """A loaded-on-demand nnU-Net model plus its bids_cl settings and provenance."""

    def __init__(self, resolved: ResolvedModel) -> None:
        self.resolved = resolved
        self.model_dir = resolved.model_dir
        root = resolved.root
        self.plans = _read_json(find_upwards(self.model_dir, root, "plans.json"))  # type: ignore[arg-type]
        self.dataset_json = _read_json(
            find_upwards(self.model_dir, root, "dataset.json"))  # type: ignore[arg-type]
        settings_path = find_upwards(self.model_dir, root, MODEL_JSON)
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
            self._checkpoints[fold] = load_checkpoint(
                self.checkpoint_files[fold], allow_code_execution=self.resolved.allow_code_execution,
                what=f"fold {fold} checkpoint of model {self.resolved.name}")
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
        wanted = [find_upwards(self.model_dir, root, n) for n in ("plans.json", "dataset.json", MODEL_JSON)]
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
        source = store.lock_source(self.resolved.lock_dir) if self.resolved.lock_dir else {}
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


def load_model(name_or_path: str | os.PathLike[str] | CLModel, *, configuration: str | None = None,
               verify: bool = True) -> CLModel:
    """A ``CLModel`` for ``"demo"``, an installed/registry name, a model folder or an export zip.

    ``verify``: see :func:`resolve_model` (False only where the run's parent verified this model).
    """
    if isinstance(name_or_path, CLModel):
        return name_or_path
    return CLModel(resolve_model(name_or_path, configuration=configuration, verify=verify))
