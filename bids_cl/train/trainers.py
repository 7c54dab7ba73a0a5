"""nnU-Net trainer subclass for bids_cl: short, configurable schedules and an optional wall-clock budget.

``BidsClTrainer`` changes only the *schedule* of nnU-Net's ``nnUNetTrainer`` (epochs, iterations per epoch,
validation iterations, learning rate, checkpoint frequency, a time budget). It never overrides
``build_network_architecture``: the network is fully described by ``plans.json``. That is why an exported
checkpoint can name ``nnUNetTrainer`` as its trainer and load anywhere nnU-Net is installed (see
``bids_cl.train.export``).

Settings reach the trainer in two ways:

* ``bids_cl-train`` constructs the class directly and calls ``apply_settings``;
* ``nnUNetv2_train ... -tr BidsClTrainer`` constructs it by name: the settings are then read from the
  environment variable ``BIDS_CL_TRAINER_SETTINGS`` (JSON, keys of ``TrainerSettings``), and nnU-Net finds
  the class through ``nnUNet_extTrainer`` pointing at a folder made by ``write_ext_trainer_shim``.

Only absolute imports here: nnU-Net's external lookup imports modules as top-level modules.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

# the module (not the class of the same name) whose global nnUNetDataLoader get_dataloaders calls
nnunet_trainer_module = importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")

SETTINGS_ENV = "BIDS_CL_TRAINER_SETTINGS"
SHIM_MODULE = "bids_cl_nnunet_trainers"


@dataclass
class TrainerSettings:
    """The schedule. Defaults suit a quick CPU fine-tune; nnU-Net's own defaults are 1000 x 250 / 50."""

    num_epochs: int = 50
    iterations_per_epoch: int = 50
    val_iterations: int = 10
    initial_lr: float = 1e-2
    save_every: int = 10
    # Stop (and write checkpoint_final) before this many seconds of training; the learning rate follows
    # the poly schedule over whichever runs out first, epochs or time, so a cut-short run still ends on a
    # low learning rate instead of mid-schedule.
    time_budget_s: float | None = None
    oversample_foreground: float | None = None
    # nnU-Net puts the sampled lesion voxel at the exact centre of every foreground-forced patch. With small
    # patches and heavy oversampling the network learns that shortcut ("a lesion sits in the middle") and
    # at sliding-window inference paints a lesion in the middle of every window. A fraction f > 0 moves the
    # patch so that the voxel lands anywhere within f x half the patch from the centre (0: nnU-Net as is).
    foreground_offset: float = 0.0

    @classmethod
    def from_env(cls) -> TrainerSettings:
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            return cls()
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{SETTINGS_ENV}: unknown keys {sorted(unknown)}")
        return cls(**data)

    def to_env(self) -> str:
        return json.dumps(asdict(self))


class _TimeBudgetReached(Exception):
    """The time budget is spent (checked between iterations and predicted at epoch ends)."""


class _BudgetPolyLR(PolyLRScheduler):
    """nnU-Net's poly schedule over ``max(epoch / num_epochs, elapsed / time_budget)``."""

    def __init__(self, optimizer: Any, initial_lr: float, max_steps: int,
                 time_progress: Callable[[], float]) -> None:
        self._time_progress = time_progress
        super().__init__(optimizer, initial_lr, max_steps)

    def step(self, current_step: int | None = None) -> None:
        if current_step is not None and current_step >= 0:
            by_time = self._time_progress() * self.max_steps
            current_step = min(max(current_step, by_time), self.max_steps - 1e-3)
        super().step(current_step)


def foreground_patch_start(start: np.ndarray, lower: np.ndarray, upper: np.ndarray, final_patch: np.ndarray,
                           fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Shift a lesion-centred patch start by up to ``fraction`` x half the (final) patch, within bounds."""
    reach = np.floor(np.asarray(final_patch) // 2 * fraction).astype(int)
    shift = np.array([rng.integers(-r, r + 1) for r in reach], dtype=int)
    return np.clip(np.asarray(start) + shift, lower, upper)


class OffCentreDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader, with foreground-forced patches no longer centred on their lesion voxel."""

    def __init__(self, *args: Any, foreground_offset: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.foreground_offset = float(foreground_offset)
        self._rng = np.random.default_rng()

    def get_bbox(self, data_shape: np.ndarray, force_fg: bool, class_locations: dict | None,
                 overwrite_class: Any = None, verbose: bool = False) -> tuple[list[int], list[int]]:
        lbs, ubs = super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        if not force_fg or self.foreground_offset <= 0:
            return lbs, ubs
        # The same admissible range of patch starts as nnU-Net's get_bbox.
        dim = len(data_shape)
        pad = np.maximum(self.need_to_pad[:dim], np.asarray(self.patch_size[:dim]) - np.asarray(data_shape))
        lower = -(pad // 2)
        upper = np.asarray(data_shape) + pad // 2 + pad % 2 - np.asarray(self.patch_size[:dim])
        start = foreground_patch_start(np.asarray(lbs), lower, upper, np.asarray(self.final_patch_size[:dim]),
                                       self.foreground_offset, self._rng)
        return start.tolist(), (start + np.asarray(self.patch_size[:dim])).tolist()


class BidsClTrainer(nnUNetTrainer):
    """nnUNetTrainer with a configurable (short) schedule; the network comes from the plans unchanged."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.settings = TrainerSettings()
        self._t0: float | None = None
        self.apply_settings(TrainerSettings.from_env())

    def apply_settings(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.num_epochs = int(settings.num_epochs)
        self.num_iterations_per_epoch = int(settings.iterations_per_epoch)
        self.num_val_iterations_per_epoch = int(settings.val_iterations)
        self.initial_lr = float(settings.initial_lr)
        self.save_every = max(1, int(settings.save_every))
        if settings.oversample_foreground is not None:
            self.oversample_foreground_percent = float(settings.oversample_foreground)

    def on_train_start(self) -> None:
        self._t0 = time.monotonic()
        super().on_train_start()
        self.print_to_log_file(f"bids_cl schedule: {asdict(self.settings)}")

    def _elapsed(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def get_dataloaders(self) -> tuple[Any, Any]:
        if self.settings.foreground_offset <= 0:
            return super().get_dataloaders()
        # nnU-Net builds its loaders inside get_dataloaders by the module-level name; swapping that name for
        # the call reuses all of nnU-Net's loader and augmentation set-up instead of restating it.
        original = nnunet_trainer_module.nnUNetDataLoader
        nnunet_trainer_module.nnUNetDataLoader = functools.partial(
            OffCentreDataLoader, foreground_offset=self.settings.foreground_offset)
        try:
            return super().get_dataloaders()
        finally:
            nnunet_trainer_module.nnUNetDataLoader = original

    def configure_optimizers(self) -> tuple[Any, Any]:
        # nnU-Net's SGD; only the scheduler is swapped for one that also counts the time budget.
        optimizer, _ = super().configure_optimizers()
        return optimizer, _BudgetPolyLR(optimizer, self.initial_lr, self.num_epochs, self._time_progress)

    def _time_progress(self) -> float:
        budget = self.settings.time_budget_s
        return self._elapsed() / budget if budget else 0.0

    def train_step(self, batch: dict) -> dict:
        # The budget is a hard limit: an epoch that turns out slower than expected (a busy CPU, a first
        # epoch with cold caches) must not overrun it, so it is also checked between iterations.
        budget = self.settings.time_budget_s
        if budget and self._elapsed() > budget:
            self.print_to_log_file(f"time budget of {budget:.0f} s reached during epoch {self.current_epoch}")
            raise _TimeBudgetReached
        return super().train_step(batch)

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        budget = self.settings.time_budget_s
        if not budget or self.current_epoch >= self.num_epochs:
            return
        last = self.logger.get_value("epoch_end_timestamps", step=-1) - \
            self.logger.get_value("epoch_start_timestamps", step=-1)
        if self._elapsed() + last > budget:
            self.print_to_log_file(f"time budget of {budget:.0f} s reached after {self.current_epoch} epochs")
            raise _TimeBudgetReached

    def run_training(self) -> None:
        try:
            super().run_training()
        except _TimeBudgetReached:
            self.on_train_end()


def write_ext_trainer_shim(folder: Path) -> Path:
    """A folder for ``nnUNet_extTrainer`` whose only module re-exports ``BidsClTrainer``.

    Pointing ``nnUNet_extTrainer`` at ``bids_cl/train`` itself would make nnU-Net import every module of
    the package as a top-level module; the shim keeps the lookup to one tiny file and returns the very
    class object of ``bids_cl.train.trainers``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SHIM_MODULE}.py").write_text(
        '"""Written by bids_cl: lets nnU-Net find BidsClTrainer via nnUNet_extTrainer."""\n'
        "from bids_cl.train.trainers import BidsClTrainer  # noqa: F401\n")
    return folder


def register_ext_trainer_dir(folder: Path) -> Path:
    """Write the shim and prepend it to ``nnUNet_extTrainer`` (keeping any folders already listed)."""
    folder = write_ext_trainer_shim(folder)
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(folder) not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([str(folder), *current])
    return folder


def inference_compatible(trainer_class: type[Any]) -> bool:
    """True when checkpoints of ``trainer_class`` can be loaded as plain ``nnUNetTrainer`` checkpoints."""
    return trainer_class.build_network_architecture is nnUNetTrainer.build_network_architecture
