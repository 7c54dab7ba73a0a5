"""Tiny, real nnU-Net v2 model folders and phantoms for tests and benchmarks.

Everything here writes the files nnU-Net itself reads (``plans.json``, ``dataset.json``,
``fold_<k>/checkpoint_final.pth`` with ``network_weights``, ``init_args``, ``trainer_name``,
``inference_allowed_mirroring_axes``) so the tests drive the real predictor. Three kinds of weights:

* ``random_weights``: nnU-Net's own He initialisation (seeded); ``bg_bias`` shifts the background logit so
  that most voxels are confidently background, like a trained lesion model.
* ``intensity_weights``: a network (built without normalisation layers) whose output is a pointwise function
  of the normalised intensity: lesion where ``z < -z_threshold``. Rotation and flip equivariant by design,
  which an orientation test needs (random convolutions are not).
* ``train_blob_weights``: a few hundred Adam steps on synthetic dark blobs: a small, confident, ordinary
  nnU-Net (instance norm and all).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainer"
PLANS_NAME = "nnUNetPlans"
DATASET_NAME = "Dataset999_BidsClTest"
# Raw-intensity fingerprint of the phantoms' lesion voxels (what nnU-Net's fingerprint extractor records).
PHANTOM_FINGERPRINT = {"max": 1000.0, "mean": 600.0, "median": 600.0, "min": 300.0,
                       "percentile_00_5": 310.0, "percentile_99_5": 980.0, "std": 150.0}


def tiny_plans(*, features: Sequence[int] = (4, 8, 16), patch: Sequence[int] = (32, 32, 32),
               spacing: Sequence[float] = (1.0, 1.0, 1.0), norm: bool = True,
               reader: str = "SimpleITKIO", max_features: int = 320,
               fingerprint: dict[str, float] | None = None,
               strides: Sequence[Sequence[int]] | None = None,
               dataset_name: str = DATASET_NAME) -> dict[str, Any]:
    """nnU-Net v2 plans with one ``3d_fullres`` PlainConvUNet configuration.

    ``strides``: pooling per stage and axis (nnU-Net's ``pool_op_kernel_sizes``); default 2 on every axis
    after the first stage, so each patch edge must be divisible by 2**(stages - 1).
    """
    n = len(features)
    strides = [list(map(int, st)) for st in strides] if strides else [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": [min(int(f), max_features) for f in features],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * n,
            "strides": strides,
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d" if norm else None,
            "norm_op_kwargs": {"eps": 1e-05, "affine": True} if norm else None,
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    config = {
        "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [int(p) for p in patch],
        "median_image_size_in_voxels": [int(p) * 2 for p in patch],
        "spacing": [float(s) for s in spacing],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [True],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
        "architecture": arch,
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "original_median_shape_after_transp": [int(p) * 2 for p in patch],
        "image_reader_writer": reader,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(fingerprint or PHANTOM_FINGERPRINT)},
    }


def tiny_dataset_json(n_training: int = 4) -> dict[str, Any]:
    return {"channel_names": {"0": "T1w"}, "labels": {"background": 0, "CL": 1},
            "numTraining": n_training, "file_ending": ".nii.gz"}


def build_network(plans: dict[str, Any], dataset_json: dict[str, Any]):  # -> torch.nn.Module
    """The network nnU-Net builds for these plans (deep supervision off, as at inference)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    return nnUNetTrainer.build_network_architecture(
        pm, cm, 1, pm.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False)


def random_weights(plans: dict[str, Any], dataset_json: dict[str, Any], *, seed: int = 0,
                   bg_bias: float = 0.0) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    net = build_network(plans, dataset_json)
    state = net.state_dict()
    seg_bias = _seg_layer_key(state, "bias")
    state[seg_bias] = state[seg_bias].clone()
    state[seg_bias][0] += bg_bias
    return state


def _seg_layer_key(state: dict[str, Any], what: str) -> str:
    keys = sorted(k for k in state if k.startswith("decoder.seg_layers.") and k.endswith(what))
    return keys[-1]


def intensity_weights(plans: dict[str, Any], dataset_json: dict[str, Any], *, z_threshold: float = 3.0,
                      gain: float = 20.0, offset: float = 2.0) -> dict[str, Any]:
    """Weights that make the (norm-free) network pointwise: logit_CL - logit_bg = gain*relu(-z - t) - offset.

    Every 3x3x3 kernel is zero except its centre tap, the deeper encoder stages and the transposed
    convolutions are zero, so the decoder sees only the stage-0 skip connection: the output at a voxel
    depends on that voxel's normalised intensity alone (and is identical in every tile and mirror).
    """
    import torch

    if plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]["norm_op"] is not None:
        raise ValueError("intensity_weights needs plans built with norm=False")
    net = build_network(plans, dataset_json)
    arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
    f0 = arch["features_per_stage"][0]
    last = len(arch["features_per_stage"]) - 2
    # Set parameters on the modules: the state dict lists shared tensors under several names.
    with torch.no_grad():
        for param in net.parameters():
            param.zero_()
        enc = net.encoder.stages[0][0].convs
        enc[0].conv.weight[0, 0, 1, 1, 1] = -1.0  # channel 0 = leaky(-z - t)
        enc[0].conv.bias[0] = -z_threshold
        enc[1].conv.weight[0, 0, 1, 1, 1] = 1.0   # passed on unchanged (positive part)
        dec = net.decoder.stages[last].convs       # input = cat(upsampled (zero), skip)
        dec[0].conv.weight[0, f0, 1, 1, 1] = 1.0
        dec[1].conv.weight[0, 0, 1, 1, 1] = 1.0
        net.decoder.seg_layers[last].weight[1, 0, 0, 0, 0] = gain
        net.decoder.seg_layers[last].bias[1] = -offset
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return state


def blob_training_batch(rng: np.random.Generator, size: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Z-scored patches of 'brain' (zero outside) with dark Gaussian blobs; targets = blob cores."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    xs, ys = [], []
    for _ in range(batch):
        centre = rng.uniform(-0.3, 1.3, 3) * size
        radius = rng.uniform(0.6, 1.2) * size
        brain = np.linalg.norm(grid - centre, axis=-1) < radius
        image = np.full((size,) * 3, 1000.0, np.float32) + rng.normal(0, 20, (size,) * 3)
        target = np.zeros((size,) * 3, np.int64)
        for _ in range(rng.integers(0, 4)):
            c = rng.uniform(0.15, 0.85, 3) * size
            sigma = rng.uniform(1.2, 3.0)
            profile = np.exp(-np.sum((grid - c) ** 2, -1) / (2 * sigma ** 2))
            image -= 700 * profile
            target[profile > 0.3] = 1
        image[~brain] = 0
        target[~brain] = 0
        if brain.any():
            vals = image[brain]
            image[brain] = (vals - vals.mean()) / max(vals.std(), 1e-8)
        xs.append(image[None].astype(np.float32))
        ys.append(target)
    return np.stack(xs), np.stack(ys)


def train_blob_weights(plans: dict[str, Any], dataset_json: dict[str, Any], *, steps: int = 150,
                       seed: int = 0, lr: float = 3e-3) -> dict[str, Any]:
    """A briefly trained, confident dark-blob detector (a few seconds on a CPU for the tiny plans)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_network(plans, dataset_json)
    size = int(plans["configurations"][CONFIGURATION]["patch_size"][0])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    weight = torch.tensor([1.0, 3.0])  # lesions are rare: weigh them up, as CL trainers do
    net.train()
    for _ in range(steps):
        x, y = blob_training_batch(rng, size, 2)
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y), weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def write_model_folder(dest: str | Path, plans: dict[str, Any], dataset_json: dict[str, Any],
                       fold_weights: dict[int | str, dict[str, Any]], *, trainer: str = TRAINER,
                       mirror_axes: tuple[int, ...] | None = (0, 1, 2),
                       settings: dict[str, Any] | None = None,
                       checkpoint_name: str = "checkpoint_final.pth") -> Path:
    """A trained-model folder exactly as ``nnUNetPredictor.initialize_from_trained_model_folder`` reads it."""
    import torch

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "plans.json").write_text(json.dumps(plans, indent=2))
    (dest / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    for fold, weights in fold_weights.items():
        fold_dir = dest / f"fold_{fold}"
        fold_dir.mkdir(exist_ok=True)
        torch.save({
            "network_weights": weights,
            "optimizer_state": None,
            "grad_scaler_state": None,
            "logging": {},
            "_best_ema": None,
            "current_epoch": 1,
            "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": fold,
                          "dataset_json": dataset_json, "device": torch.device("cpu")},
            "trainer_name": trainer,
            "inference_allowed_mirroring_axes": mirror_axes,
        }, fold_dir / checkpoint_name)
    if settings is not None:
        (dest / "bids_cl_model.json").write_text(json.dumps(settings, indent=2))
    return dest


def export_zip(model_dir: str | Path, zip_path: str | Path, *, dataset_name: str = DATASET_NAME,
               trainer: str = TRAINER) -> Path:
    """The layout of ``nnUNetv2_export_model_to_zip``: ``<dataset>/<trainer>__<plans>__<config>/...``."""
    model_dir, zip_path = Path(model_dir), Path(zip_path)
    prefix = f"{dataset_name}/{trainer}__{PLANS_NAME}__{CONFIGURATION}"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, _dirs, files in os.walk(model_dir):
            for name in sorted(files):
                full = Path(root) / name
                zf.write(full, f"{prefix}/{full.relative_to(model_dir).as_posix()}")
    return zip_path


# ---------------------------------------------------------------- SynthStrip

def write_synthstrip_checkpoint(path: str | Path, *, seed: int = 0,
                                intensity_threshold: float | None = None) -> Path:
    """A SynthStrip checkpoint as FreeSurfer ships ``synthstrip.1.pt``: ``{"model_state_dict": ...}`` of
    nipreps-synthstrip's ``StripModel`` (what its loader reads), with seeded random weights.

    FreeSurfer's weights may not be redistributed, so tests and container smoke checks use this file.
    ``intensity_threshold``: overwrite the first encoder level and the last full-resolution layers so that
    the network's output (the signed distance to the brain surface, mm) is ``10 * (threshold - x)``, ``x``
    being the scaled input intensity (0..1): the first encoder level passes ``x`` on in its channel 0, which
    reaches the last layers through the top skip connection. Tissue brighter than the threshold is then
    "inside", which gives a real mask on a phantom instead of noise.
    """
    import torch
    from nipreps.synthstrip.model import StripModel

    torch.manual_seed(seed)
    model = StripModel()
    if intensity_threshold is not None:
        enc_a, enc_b = (block.conv for block in model.encoder[0])
        first, second, last = (block.conv for block in model.remaining)
        skip = first.in_channels - enc_b.out_channels  # where the top skip connection starts
        with torch.no_grad():
            for conv in (enc_a, enc_b, first, second, last):
                conv.weight.zero_()
                conv.bias.zero_()
            enc_a.weight[0, 0, 1, 1, 1] = 1.0  # leaky ReLU leaves x >= 0 unchanged
            enc_b.weight[0, 0, 1, 1, 1] = 1.0
            first.weight[0, skip, 1, 1, 1] = 1.0
            second.weight[0, 0, 1, 1, 1] = 1.0
            last.weight[0, 0, 1, 1, 1] = -10.0
            last.bias[0] = 10.0 * float(intensity_threshold)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": model.state_dict()}, path)
    return path


# ---------------------------------------------------------------- phantoms

def phantom(shape: Sequence[int], affine: np.ndarray, *, brain_centre: Sequence[float] = (0, 0, 0),
            brain_radii: Sequence[float] = (40, 48, 38),
            blobs: Sequence[tuple[Sequence[float], float]] = (),
            depth: float = 700.0, noise: float = 0.0, seed: int = 0):  # -> nib.Nifti1Image
    """A skull-stripped T1w-like image sampled from world (scanner mm) coordinates.

    Brain = ellipsoid of intensity 1000 (0 outside); each blob ``(centre_mm, sigma_mm)`` is a dark
    Gaussian dip of ``depth``. Because everything is defined in world space, the same phantom can be
    sampled on RAS, LPS or oblique grids.
    """
    import nibabel as nib

    ijk = np.indices(tuple(shape), dtype=np.float32).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).T.astype(np.float32)
    rel = (xyz - np.asarray(brain_centre, np.float32)) / np.asarray(brain_radii, np.float32)
    brain = np.sum(rel ** 2, axis=1) <= 1.0
    values = np.full(xyz.shape[0], 1000.0, np.float32)
    for centre, sigma in blobs:
        d2 = np.sum((xyz - np.asarray(centre, np.float32)) ** 2, axis=1)
        values -= depth * np.exp(-d2 / (2.0 * sigma ** 2))
    if noise:
        values += np.random.default_rng(seed).normal(0, noise, values.shape).astype(np.float32)
    values[~brain] = 0.0
    img = nib.Nifti1Image(values.reshape(tuple(shape)), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def centred_affine(shape: Sequence[int], zooms: Sequence[float] = (1.0, 1.0, 1.0),
                   axcodes: str = "RAS", rotation_deg: float = 0.0) -> np.ndarray:
    """An affine with the given axis codes / voxel size whose grid centre sits at world (0, 0, 0),
    optionally rotated about the z axis (oblique)."""
    sign = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    mat = np.zeros((3, 3))
    for col, code in enumerate(axcodes):
        row, s = sign[code]
        mat[row, col] = s * zooms[col]
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    mat = rot @ mat
    affine = np.eye(4)
    affine[:3, :3] = mat
    affine[:3, 3] = -mat @ ((np.asarray(shape, float) - 1) / 2.0)
    return affine
