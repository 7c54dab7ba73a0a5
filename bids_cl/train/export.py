"""Turn nnU-Net's training output into a bids_cl model folder (the layout ``bids_cl.engine`` loads).

Model folder::

    bids_cl_model.json        name, description, warning, orientation "RAS", training recipe
    dataset.json  plans.json  dataset_fingerprint.json
    fold_<k>/checkpoint_final.pth
    <lock file>               written by bids_cl.engine.write_lock_file (hashes of the files above)

Checkpoints are slimmed and made trainer-neutral: ``BidsClTrainer`` changes only the training schedule, not
the network (``trainers.inference_compatible``), so the checkpoint's ``trainer_name`` is rewritten to
``nnUNetTrainer``. Inference then needs nothing from bids_cl.train, and the model folder also works with
plain ``nnUNetv2_predict``. The optimizer state is dropped (it doubles the size and only serves to resume
an interrupted run; fine-tuning starts from the weights alone).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bids_cl.engine.checkpoints import load_checkpoint, plain_python
from bids_cl.engine.lockfile import write_lock_file
from bids_cl.engine.store_layout import MODEL_JSON
from bids_cl.errors import EXIT_MISSING_INPUT, BidsClError

NEUTRAL_TRAINER = "nnUNetTrainer"
TRAINER_CLASS = "bids_cl.train.trainers.BidsClTrainer"
_DROP_KEYS = ("optimizer_state", "grad_scaler_state")


def slim_checkpoint(src: Path, dst: Path, *, trainer_class: type[Any]) -> dict[str, Any]:
    """Copy a checkpoint without optimizer state, renaming the trainer when that is safe.

    nnU-Net's fresh checkpoint is read with the engine's safe loader like any other; numpy scalars of its
    training log become Python numbers, so the exported checkpoint loads with plain ``weights_only=True``.
    """
    import torch

    from bids_cl.train.trainers import inference_compatible

    ckpt = plain_python(load_checkpoint(src, what="nnU-Net training checkpoint"))
    for key in _DROP_KEYS:
        ckpt[key] = None
    if inference_compatible(trainer_class):
        ckpt["trainer_name"] = NEUTRAL_TRAINER
    # init_args hold a torch.device of the training machine; inference ignores it, keep it neutral.
    if isinstance(ckpt.get("init_args"), dict) and "device" in ckpt["init_args"]:
        ckpt["init_args"]["device"] = torch.device("cpu")
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, str(dst))
    return {"trainer_name": ckpt["trainer_name"], "epochs": int(ckpt.get("current_epoch", 0))}


def export_model(training_output_dir: Path, model_dir: Path, *, folds: list[int], name: str,
                 description: str, warning: str, trainer_class: type[Any],
                 training: dict[str, Any] | None = None, log: Any = print) -> Path:
    """Assemble ``model_dir`` from nnU-Net's ``<results>/<dataset>/<trainer>__<plans>__<config>``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for fname in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
        shutil.copyfile(training_output_dir / fname, model_dir / fname)
    ckpt_info = {}
    for fold in folds:
        src = training_output_dir / f"fold_{fold}" / "checkpoint_final.pth"
        if not src.is_file():
            raise BidsClError(f"training did not finish: {src} is missing", EXIT_MISSING_INPUT)
        ckpt_info[str(fold)] = slim_checkpoint(src, model_dir / f"fold_{fold}" / "checkpoint_final.pth",
                                               trainer_class=trainer_class)
    meta = {
        "name": name,
        "description": description,
        "warning": warning,
        "orientation": "RAS",
        "configuration": "3d_fullres",
        "folds": list(folds),
        "trainer_class": f"{trainer_class.__module__}.{trainer_class.__qualname__}",
        "checkpoint_trainer_name": next(iter(ckpt_info.values()))["trainer_name"],
        "training": training or {},
    }
    (model_dir / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    write_lock_file(model_dir)
    return model_dir
