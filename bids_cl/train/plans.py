"""nnU-Net planning and preprocessing, with an optional reduced network (a plans edit, not new code).

nnU-Net's own planner designs the network for the chosen target spacing; ``reduce_configuration`` then caps
it (fewer stages, fewer features, smaller patch) so that a demo model stays a few MB and runs on a laptop CPU
in seconds. The planner's output stays nnU-Net's standard ``plans.json``: nothing about the architecture
is hard-coded in the code that runs the model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIGURATION = "3d_fullres"
PLANS_NAME = "bidsclPlans"


@dataclass
class NetworkSpec:
    """Caps applied to the planner's 3d_fullres network. ``None`` keeps nnU-Net's choice."""

    max_stages: int | None = None
    base_features: int | None = None
    max_features: int | None = None
    patch_size: tuple[int, int, int] | None = None
    batch_size: int | None = None
    # Dice over the whole batch instead of per patch. For small, sparse lesions the per-patch Dice rewards
    # an empty prediction on every lesion-free patch, and a short schedule can settle there.
    batch_dice: bool | None = None

    def is_default(self) -> bool:
        return all(v is None for v in asdict(self).values())


# The demo model's network: 4 stages 12-24-48-96, 32^3 patches, batch 4 (0.79 M parameters, 3.2 MB
# checkpoint). Small patches in larger batches: on 2 CPU cores an iteration costs ~0.45 s, and with heavy
# foreground oversampling most patches of a batch hold a lesion, which got training off the "predict
# nothing" plateau within 13-27 epochs where 48^3 x 2 had not left it after 12 (docs/demo-model.md).
SMALL_NETWORK = NetworkSpec(max_stages=4, base_features=12, max_features=96, patch_size=(32, 32, 32),
                            batch_size=4, batch_dice=True)


@dataclass
class NnunetFolders:
    raw: Path
    preprocessed: Path
    results: Path


def use_work_dir(work_dir: Path) -> NnunetFolders:
    """Point nnU-Net's three folders at ``work_dir`` (nnU-Net reads them from the environment)."""
    folders = NnunetFolders(work_dir / "nnUNet_raw", work_dir / "nnUNet_preprocessed",
                            work_dir / "nnUNet_results")
    for name, path in (("nnUNet_raw", folders.raw), ("nnUNet_preprocessed", folders.preprocessed),
                       ("nnUNet_results", folders.results)):
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    return folders


def dataset_name(dataset_id: int, name: str) -> str:
    return f"Dataset{dataset_id:03d}_{name}"


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def reduce_configuration(conf: dict[str, Any], spec: NetworkSpec) -> dict[str, Any]:
    """Return a copy of a 3d_fullres configuration with the network capped as ``spec`` says."""
    conf = copy.deepcopy(conf)
    arch = conf["architecture"]["arch_kwargs"]
    n = int(arch["n_stages"])
    if spec.max_stages is not None:
        n = max(2, min(n, spec.max_stages))
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
        arch[key] = list(arch[key])[:n]
    arch["n_conv_per_stage_decoder"] = list(arch["n_conv_per_stage_decoder"])[: n - 1]
    arch["n_stages"] = n
    features = [int(f) for f in arch["features_per_stage"]]
    if spec.base_features is not None:
        features = [spec.base_features * 2**i for i in range(n)]
    if spec.max_features is not None:
        features = [min(f, spec.max_features) for f in features]
    arch["features_per_stage"] = features

    # The patch must be divisible by the total downsampling of each axis.
    divisors = [math.prod(int(s[axis]) for s in arch["strides"]) for axis in range(3)]
    patch = list(spec.patch_size) if spec.patch_size is not None else [int(p) for p in conf["patch_size"]]
    conf["patch_size"] = [_round_up(p, d) for p, d in zip(patch, divisors, strict=True)]
    return apply_batch_settings(conf, spec)


def apply_batch_settings(conf: dict[str, Any], spec: NetworkSpec) -> dict[str, Any]:
    """Set the batch size and batch Dice of a 3d_fullres configuration (in place; ``None`` keeps it).

    Neither changes the network, so unlike the caps above they also apply when fine-tuning a model's
    plans: a GPU can take a larger batch than the CPU the model was first trained on.
    """
    if spec.batch_size is not None:
        conf["batch_size"] = int(spec.batch_size)
    if spec.batch_dice is not None:
        conf["batch_dice"] = bool(spec.batch_dice)
    return conf


def _only_fullres(plans: dict[str, Any]) -> dict[str, Any]:
    # 2d and the cascade are never used by bids_cl; dropping them halves preprocessing time.
    plans["configurations"] = {CONFIGURATION: plans["configurations"][CONFIGURATION]}
    return plans


def plan(dataset_id: int, *, target_spacing: float | None, network: NetworkSpec,
         num_processes: int = 1, log: Any = print) -> dict[str, Any]:
    """Fingerprint, plan (nnU-Net's ExperimentPlanner), reduce; writes ``<ds>/bidsclPlans.json``."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=True,
                                clean=True, verbose=False, show_progress_bar=False)
    spacing = None if target_spacing is None else [float(target_spacing)] * 3
    plan_experiment_dataset(dataset_id, overwrite_target_spacing=spacing, overwrite_plans_name=PLANS_NAME)
    plans_file = Path(nnUNet_preprocessed.require()) / convert_id_to_dataset_name(dataset_id) / \
        f"{PLANS_NAME}.json"
    plans = _only_fullres(json.loads(plans_file.read_text()))
    if not network.is_default():
        conf = plans["configurations"][CONFIGURATION]
        plans["configurations"][CONFIGURATION] = reduce_configuration(conf, network)
    plans_file.write_text(json.dumps(plans, indent=2) + "\n")
    arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
    log(f"plans: spacing {plans['configurations'][CONFIGURATION]['spacing']}, patch "
        f"{plans['configurations'][CONFIGURATION]['patch_size']}, features {arch['features_per_stage']}")
    return plans


def plans_from_model(dataset_id: int, model_dir: Path, *, log: Any = print) -> dict[str, Any]:
    """Reuse a trained model's plans for a new dataset (fine-tuning needs the same network and spacing).

    nnU-Net's ``nnUNetv2_move_plans_between_datasets`` does the same; here the plans come from a model
    folder, which is what a lab has. The fingerprint is still computed for the new data (nnU-Net needs it).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    extract_fingerprint_dataset(dataset_id, num_processes=1, check_dataset_integrity=True, clean=True,
                                verbose=False, show_progress_bar=False)
    plans = json.loads((model_dir / "plans.json").read_text())
    name = convert_id_to_dataset_name(dataset_id)
    plans["dataset_name"] = name
    plans["plans_name"] = PLANS_NAME
    plans = _only_fullres(plans)
    # Give the preprocessed data a name of its own so it never mixes with another plans' data.
    plans["configurations"][CONFIGURATION]["data_identifier"] = f"{PLANS_NAME}_{CONFIGURATION}"
    out = Path(nnUNet_preprocessed.require()) / name / f"{PLANS_NAME}.json"
    out.write_text(json.dumps(plans, indent=2) + "\n")
    # nnU-Net's planner would have copied the raw dataset.json next to the plans; preprocessing needs it.
    shutil.copyfile(Path(nnUNet_raw.require()) / name / "dataset.json", out.parent / "dataset.json")
    log(f"plans copied from {model_dir}")
    return plans


def preprocess(dataset_id: int, *, num_processes: int = 1) -> None:
    """nnU-Net's DefaultPreprocessor (crop, resample, z-score) for the 3d_fullres configuration."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    preprocess_dataset(dataset_id, PLANS_NAME, configurations=[CONFIGURATION],
                       num_processes=[num_processes], verbose=False, show_progress_bar=False)


def write_splits(preprocessed_dataset_dir: Path, case_participants: dict[str, str], *, folds: int,
                 val_fraction: float, seed: int) -> list[dict[str, list[str]]]:
    """``splits_final.json`` grouped by participant, so no participant is in both train and validation.

    ``folds == 1``: one split holding out ``val_fraction`` of the participants (at least one) for nnU-Net's
    validation pseudo-Dice. ``folds > 1``: a k-fold cross-validation over participants.
    """
    import numpy as np

    participants = sorted(set(case_participants.values()))
    order = list(np.random.default_rng(seed).permutation(participants))
    if folds == 1:
        n_val = max(1, round(len(order) * val_fraction)) if len(order) > 1 else 0
        groups = [order[:n_val]]
    else:
        if len(order) < folds:
            raise ValueError(f"{folds} folds need at least {folds} participants, got {len(order)}")
        groups = [order[i::folds] for i in range(folds)]
    splits = []
    for held_out in groups:
        val = sorted(c for c, p in case_participants.items() if p in held_out)
        train = sorted(c for c, p in case_participants.items() if p not in held_out)
        # A single-participant dataset cannot hold one out: validate on the training data (nnU-Net warns).
        splits.append({"train": train, "val": val or list(train)})
    (preprocessed_dataset_dir / "splits_final.json").write_text(json.dumps(splits, indent=2) + "\n")
    return splits


def describe(plans: dict[str, Any]) -> dict[str, Any]:
    conf = plans["configurations"][CONFIGURATION]
    arch = conf["architecture"]["arch_kwargs"]
    return {"spacing": conf["spacing"], "patch_size": conf["patch_size"], "batch_size": conf["batch_size"],
            "batch_dice": conf.get("batch_dice"), "n_stages": arch["n_stages"],
            "features_per_stage": arch["features_per_stage"]}


def _as_tuple3(values: Sequence[int] | None) -> tuple[int, int, int] | None:
    if values is None:
        return None
    vals = [int(v) for v in values]
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3:
        raise ValueError("a patch size is one or three integers")
    return vals[0], vals[1], vals[2]
