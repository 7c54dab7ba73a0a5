"""The training pipeline: convert -> plan + preprocess -> train (nnU-Net) -> export a bids_cl model folder.

Each step reads what the previous one wrote under the work folder, so steps can be run separately
(``--steps``), e.g. plan and preprocess on a workstation, train on a GPU node, export anywhere.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_cl.errors import EXIT_MISSING_INPUT, EXIT_USAGE, BidsClError
from bids_cl.train.convert import build_raw_dataset, find_cases
from bids_cl.train.plans import (
    CONFIGURATION,
    PLANS_NAME,
    NetworkSpec,
    apply_batch_settings,
    dataset_name,
    describe,
    plan,
    plans_from_model,
    preprocess,
    use_work_dir,
    write_splits,
)
from bids_cl.train.trainers import BidsClTrainer, TrainerSettings, register_ext_trainer_dir

if TYPE_CHECKING:
    from bids_cl.engine.models import ResolvedModel

STEPS = ("convert", "plan", "train", "export", "tune")
DEFAULT_WARNING = ("Research use only. Trained on the data described in 'training'; check its performance on "
                   "your own data before relying on it.")


@dataclass
class TrainOptions:
    bids_dir: Path
    labels_dir: Path
    work_dir: Path
    output_model: Path | None = None
    participants: list[str] | None = None
    sequences: list[str] | None = None
    skull_strip: str = "auto"
    synthstrip_model: str | None = None
    dataset_id: int = 501
    dataset_name: str = "BidsClCL"
    target_spacing: float | None = 1.0
    network: NetworkSpec = field(default_factory=NetworkSpec)
    from_model: ResolvedModel | None = None  # resolved and lock-verified by the engine
    folds: int = 1
    val_fraction: float = 0.2
    split_seed: int = 0
    settings: TrainerSettings = field(default_factory=TrainerSettings)
    device: str = "auto"
    nthreads: int = 1
    n_proc_da: int = 1
    steps: tuple[str, ...] = STEPS
    validate: bool = False
    compile: bool = False
    name: str = "custom"
    description: str = ""
    warning: str = DEFAULT_WARNING


def _log(msg: str) -> None:
    print(f"bids_cl-train: {msg}", flush=True)


def configure_environment(opts: TrainOptions) -> None:
    """nnU-Net folders, worker counts and compile switch; must run before nnU-Net modules are used."""
    use_work_dir(opts.work_dir)
    # nnU-Net's planner also reads nnUNet_n_proc_DA (as a torch thread count, so it must be >= 1); the
    # training worker count is set in train_fold.
    os.environ["nnUNet_n_proc_DA"] = str(max(1, opts.nthreads))
    os.environ["nnUNet_def_n_proc"] = str(max(1, opts.nthreads))
    # torch.compile costs a minute up front and is not worth it for short schedules; nnU-Net enables it
    # by default on CUDA.
    os.environ["nnUNet_compile"] = "t" if opts.compile else "f"
    register_ext_trainer_dir(opts.work_dir / "nnunet_ext_trainers")


def resolve_device(name: str, nthreads: int) -> Any:
    """The engine's device rule (``bids_cl.engine.device``), plus torch's thread count for training."""
    import torch

    from bids_cl.engine.device import resolve_device as engine_device

    device = engine_device(name)
    if device.type == "cpu":
        torch.set_num_threads(max(1, nthreads))
    else:
        # nnU-Net's advice: on GPU, torch threads only compete with the augmentation workers.
        torch.set_num_threads(1)
    return device


def _dataset_dirs(opts: TrainOptions) -> tuple[Path, Path]:
    name = dataset_name(opts.dataset_id, opts.dataset_name)
    return opts.work_dir / "nnUNet_raw" / name, opts.work_dir / "nnUNet_preprocessed" / name


def step_convert(opts: TrainOptions) -> None:
    raw_dir, _ = _dataset_dirs(opts)
    cases, unannotated = find_cases(opts.bids_dir, opts.labels_dir, participants=opts.participants,
                                    sequences=opts.sequences, log=_log)
    if unannotated:
        _log(f"{len(unannotated)} image(s) without a manual CL mask are skipped: {', '.join(unannotated[:5])}"
             + (" ..." if len(unannotated) > 5 else ""))
    # Start from an empty raw folder: a case removed from the BIDS dataset must not linger.
    if raw_dir.exists():
        shutil.rmtree(raw_dir)
    _log(f"converting {len(cases)} case(s) into {raw_dir}")
    build_raw_dataset(cases, raw_dir, skull_strip=opts.skull_strip, nthreads=opts.nthreads,
                      synthstrip_model=opts.synthstrip_model, log=_log)


def step_plan(opts: TrainOptions) -> None:
    raw_dir, pp_dir = _dataset_dirs(opts)
    if not (raw_dir / "dataset.json").is_file():
        raise BidsClError(f"no converted dataset in {raw_dir}: run the convert step first",
                          EXIT_MISSING_INPUT)
    if opts.from_model is not None:
        plans_from_model(opts.dataset_id, opts.from_model.model_dir, log=_log)
    else:
        plan(opts.dataset_id, target_spacing=opts.target_spacing, network=opts.network,
             num_processes=opts.nthreads, log=_log)
    _log("preprocessing (nnU-Net DefaultPreprocessor)")
    preprocess(opts.dataset_id, num_processes=max(1, opts.nthreads))
    cases = json.loads((raw_dir / "bids_cl_cases.json").read_text())
    try:
        splits = write_splits(pp_dir, {c["case_id"]: c["participant"] for c in cases}, folds=opts.folds,
                              val_fraction=opts.val_fraction, seed=opts.split_seed)
    except ValueError as exc:
        raise BidsClError(f"--folds: {exc}", EXIT_USAGE) from exc
    _log(f"{len(splits)} split(s): " + "; ".join(f"{len(s['train'])} train / {len(s['val'])} val"
                                                  for s in splits))


def _load_init_weights(trainer: BidsClTrainer, source: ResolvedModel, fold: int) -> None:
    """Fine-tuning: start from a model's weights (all layers: the labels are the same background/CL),
    read with the engine's safe checkpoint loader."""
    from bids_cl.engine.checkpoints import load_checkpoint
    from bids_cl.engine.store_layout import fold_checkpoints

    checkpoints = fold_checkpoints(source.model_dir)
    src = checkpoints.get(fold) or next(iter(checkpoints.values()))
    state = load_checkpoint(src, allow_code_execution=source.allow_code_execution,
                            what=f"checkpoint of the model {source.name}")["network_weights"]
    trainer.network.load_state_dict(state)
    _log(f"fold {fold}: initialised from {src}")


def train_fold(opts: TrainOptions, fold: int, device: Any) -> dict[str, Any]:
    import torch

    _, pp_dir = _dataset_dirs(opts)
    plans = json.loads((pp_dir / f"{PLANS_NAME}.json").read_text())
    plans["continue_training"] = False  # nnUNetTrainer.__init__ expects (and pops) this key
    # --batch-size / --batch-dice: set at plan time too, but a fine-tune (plans copied from a model) and
    # a separate --steps train get them here. The trainer saves these plans next to its checkpoints.
    apply_batch_settings(plans["configurations"][CONFIGURATION], opts.network)
    dataset_json = json.loads((pp_dir / "dataset.json").read_text())
    os.environ["nnUNet_n_proc_DA"] = str(opts.n_proc_da)
    trainer = BidsClTrainer(plans=plans, configuration=CONFIGURATION, fold=fold, dataset_json=dataset_json,
                            device=device)
    trainer.apply_settings(opts.settings)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
    if opts.from_model is not None:
        trainer.initialize()
        _load_init_weights(trainer, opts.from_model, fold)
    t0 = time.monotonic()
    trainer.run_training()
    seconds = time.monotonic() - t0
    if opts.validate:
        trainer.perform_actual_validation(False)
    ema = trainer.logger.get_value("ema_fg_dice", step=None)
    return {"fold": fold, "epochs": int(trainer.current_epoch), "seconds": round(seconds, 1),
            "final_ema_pseudo_dice": round(float(ema[-1]), 4) if len(ema) else None,
            "device": describe_device(device, opts.nthreads)}


def describe_device(device: Any, nthreads: int) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.processor() or platform.machine()}, {nthreads} thread(s))"


def training_output_dir(opts: TrainOptions) -> Path:
    name = dataset_name(opts.dataset_id, opts.dataset_name)
    return opts.work_dir / "nnUNet_results" / name / f"BidsClTrainer__{PLANS_NAME}__{CONFIGURATION}"


def _recipe(opts: TrainOptions, results: list[dict[str, Any]], device: Any) -> dict[str, Any]:
    raw_dir, pp_dir = _dataset_dirs(opts)
    cases = json.loads((raw_dir / "bids_cl_cases.json").read_text()) if \
        (raw_dir / "bids_cl_cases.json").is_file() else []
    plans = json.loads((pp_dir / f"{PLANS_NAME}.json").read_text())
    import torch

    from bids_cl import __version__

    return {
        "command": shlex.join(["bids_cl-train", *sys.argv[1:]]),
        "cases": len(cases),
        "participants": sorted({c["participant"] for c in cases}),
        "sequences": sorted({c["sequence"] for c in cases}),
        "skull_strip": sorted({c["record"].get("skull_strip", "") for c in cases}),
        "network": describe(plans),
        "schedule": asdict(opts.settings),
        "fine_tuned_from": source_model_record(opts.from_model) if opts.from_model else None,
        "folds": results,
        "device": sorted({r.get("device", "") for r in results}) or [describe_device(device, opts.nthreads)],
        "versions": {"bids_cl": __version__, "nnunetv2": importlib.metadata.version("nnunetv2"),
                     "torch": torch.__version__},
    }


def source_model_record(source: ResolvedModel) -> dict[str, Any]:
    """Which model a fine-tune started from: its name, folder and checkpoint hashes.

    The folder alone is a path on the training machine; the name and the SHA-256 of each starting
    checkpoint identify the weights wherever the new model travels. A locked model's hashes come from
    its lock (verified when the model was resolved), so the checkpoints are not read twice.
    """
    from bids_cl.engine.lockfile import read_lock_file, sha256_file
    from bids_cl.engine.store_layout import MODEL_JSON, fold_checkpoints

    model_dir = source.model_dir
    meta_file = model_dir / MODEL_JSON
    name = json.loads(meta_file.read_text()).get("name") if meta_file.is_file() else None
    lock_dir = source.lock_dir
    locked: dict[str, str] = (read_lock_file(lock_dir) or {}).get("files", {}) if lock_dir else {}
    hashes = {}
    for checkpoint in fold_checkpoints(model_dir).values():
        in_lock = locked.get(checkpoint.relative_to(lock_dir).as_posix()) if lock_dir else None
        hashes[checkpoint.relative_to(model_dir).as_posix()] = in_lock or sha256_file(checkpoint)
    return {"name": name or source.name, "path": str(model_dir), "trust": source.trust,
            "checkpoints_sha256": hashes}


def run(opts: TrainOptions) -> Path | None:
    """Run the requested steps; returns the model folder when the export or tune step ran."""
    opts.work_dir = Path(opts.work_dir).absolute()
    configure_environment(opts)
    if "convert" in opts.steps:
        step_convert(opts)
    if "plan" in opts.steps:
        step_plan(opts)
    device = resolve_device(opts.device, opts.nthreads)
    results_file = opts.work_dir / "bids_cl_train_results.json"
    if "train" in opts.steps:
        results = [train_fold(opts, fold, device) for fold in range(opts.folds)]
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        for r in results:
            _log(f"fold {r['fold']}: {r['epochs']} epochs in {r['seconds']} s, EMA pseudo Dice "
                 f"{r['final_ema_pseudo_dice']}")
    model_dir = Path(opts.output_model or opts.work_dir / "model")
    if "export" in opts.steps:
        results = json.loads(results_file.read_text()) if results_file.is_file() else []
        from bids_cl.train.export import export_model

        export_model(training_output_dir(opts), model_dir, folds=list(range(opts.folds)), name=opts.name,
                     description=opts.description or f"nnU-Net CL model trained with bids_cl-train "
                     f"({opts.dataset_name})", warning=opts.warning, trainer_class=BidsClTrainer,
                     training=_recipe(opts, results, device), log=_log)
        _log(f"model written to {model_dir}")
    if "tune" in opts.steps:
        from bids_cl.engine.store_layout import MODEL_JSON
        from bids_cl.train.tune import tune_postprocessing

        if not (model_dir / MODEL_JSON).is_file():
            raise BidsClError(f"no exported model in {model_dir}: run the export step first",
                              EXIT_MISSING_INPUT)
        raw_dir, pp_dir = _dataset_dirs(opts)
        tune_postprocessing(model_dir, raw_dir, pp_dir, folds=range(opts.folds), device=opts.device,
                            nthreads=opts.nthreads, log=_log)
    return model_dir if {"export", "tune"} & set(opts.steps) else None
