"""``segment()`` and ``CLSegmenter``: image in, lesion probability / mask / table / summary out.

Configure once, predict many: ``CLSegmenter(model, device=...)`` builds the predictor and loads the fold
weights once; ``.segment(image)`` runs one image. ``segment(image, model, ...)`` is the one-shot form.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from bids_cl.derivatives.records import SegmentationRecord
from bids_cl.engine import orientation as orient
from bids_cl.engine import predictor as pred
from bids_cl.engine.device import resolve_device
from bids_cl.engine.lesions import intensity_ood, lesion_table, summarize, voxel_volume_ul
from bids_cl.engine.models import CLModel, load_model
from bids_cl.engine.postproc import (
    min_size_in_voxels,
    postprocess,
    postprocess_mask,
    threshold_probability,
)
from bids_cl.errors import EXIT_BAD_DATA, EXIT_MISSING_INPUT, BidsClError
from bids_cl.utils.components import structuring_element

log = logging.getLogger("bids_cl.engine")

ImageLike = str | os.PathLike[str] | nib.spatialimages.SpatialImage
_AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class SegmentationResult:
    """Everything one segmentation produces; images are on the input image's grid and header."""

    probability: nib.Nifti1Image          # float32 ensemble lesion probability
    mask: nib.Nifti1Image                 # uint8 final lesion mask (after threshold and size filter)
    lesions: pd.DataFrame                 # one row per lesion (bids_cl.derivatives.spec.LESION_COLUMNS)
    record: SegmentationRecord            # every setting used, typed (what the writer receives)
    summary: dict[str, Any]               # per-image summary: counts + record (+ Warnings, Timings)
    provenance: dict[str, Any]            # the model's provenance (also summary["Model"])
    labels: nib.Nifti1Image | None = None  # int32 lesion ids (the table's lesion_id)
    fold_probabilities: list[nib.Nifti1Image] | None = None  # per fold, when the model has several
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class PreparedImage:
    """One image read, checked and preprocessed for the network (``CLSegmenter.prepare``)."""

    img: nib.Nifti1Image                  # the input image (its grid and header are the outputs')
    brain: np.ndarray                     # bool brain region on the input grid
    plan: orient.Reorientation            # input order <-> the model's axis order
    tensor: torch.Tensor | None           # nnU-Net's preprocessed (1, z, y, x) float32 input
    tile_mask: torch.Tensor               # nnU-Net's non-zero region: tiles outside it are skipped
    properties: dict[str, Any]            # nnU-Net's preprocessing properties (for the export)
    ood: str | None                       # the intensity warning, if any
    timings: dict[str, float]
    started: float                        # perf_counter() when prepare began


@dataclass
class LesionProbabilities:
    """The ensemble's and each fold's lesion probability on the input grid (``CLSegmenter.infer``)."""

    img: nib.Nifti1Image
    probability: np.ndarray               # float32, 0 outside the brain
    fold_masks: list[np.ndarray]          # bool, each fold's probability above the threshold (several folds)
    folds: list[np.ndarray]               # each fold's probability, only when the segmenter keeps them
    ood: str | None
    timings: dict[str, float]
    started: float
    tiles_run: int | None = None
    tiles_total: int | None = None


def _as_image(image: ImageLike, what: str) -> nib.spatialimages.SpatialImage:
    if isinstance(image, nib.spatialimages.SpatialImage):
        img = image
    else:
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise BidsClError(f"{what} not found: {path}", EXIT_MISSING_INPUT)
        try:
            img = nib.load(path)
        except Exception as exc:  # nibabel raises many types for unreadable files
            raise BidsClError(f"cannot read {what} {path}: {exc}", EXIT_BAD_DATA) from exc
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise BidsClError(f"{what} must be a 3-D image, not shape {img.shape}", EXIT_BAD_DATA)
    if min(img.shape) < 2:
        raise BidsClError(f"{what} is too small: shape {img.shape}", EXIT_BAD_DATA)
    if not isinstance(img, nib.Nifti1Image):
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    return img


def default_threads() -> int:
    from bids_cl.utils.resources import effective_cpus

    return effective_cpus().omp_nthreads


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _resolve_setting(user: Any, tuned: Any, default: Any) -> tuple[Any, str]:
    """A post-processing setting and where it came from: the caller's, else the model's, else the default."""
    if user is not None:
        return user, "user"
    if tuned is not None:
        return tuned, "model"
    return default, "default"


class CLSegmenter:
    """A configured nnU-Net CL segmenter: build once, call ``segment`` for each image."""

    def __init__(self, model: str | os.PathLike[str] | CLModel, *, device: str | torch.device = "auto",
                 folds: Sequence[int | str] | None = None, tta: bool | None = None,
                 threshold: float | None = None, min_lesion_size: int | float | str | None = None,
                 connectivity: int = 26, nthreads: int | None = None, fast: bool = True,
                 tile_step_size: float = 0.5, compile_network: bool = False,
                 precision: str | None = None, keep_fold_probabilities: bool = True) -> None:
        self.model = load_model(model)
        self.device = resolve_device(device)
        self.nthreads = int(nthreads) if nthreads else default_threads()
        structuring_element(connectivity)  # validate early
        # None: the model's tuned value where it carries one, else nnU-Net's argmax (0.5) / every lesion kept.
        self.threshold, self.threshold_source = _resolve_setting(
            None if threshold is None else float(threshold), self.model.tuned_threshold, 0.5)
        tuned_size = self.model.tuned_min_lesion_size_ul
        self.min_lesion_size, self.min_lesion_size_source = _resolve_setting(
            min_lesion_size, None if tuned_size is None else f"{tuned_size:g}uL", None)
        self.connectivity = connectivity
        self.warnings: list[str] = []
        if self.device.type == "cpu":
            if tta is None:
                tta = False
                log.warning("no CUDA GPU: running nnU-Net on %d CPU thread(s) without test-time mirroring "
                            "(mirroring is on by default only on a GPU; on the CPU it is about 8x slower: "
                            "segment(..., tta=True) in Python turns it on)", self.nthreads)
            else:
                log.warning("no CUDA GPU: running nnU-Net on %d CPU thread(s)", self.nthreads)
        self.tta = bool(True if tta is None else tta)
        self.folds = self.model.select_folds(folds)
        self.fast = fast
        self.keep_fold_probabilities = keep_fold_probabilities
        self.predictor, warnings = pred.make_predictor(
            self.model, device=self.device, tta=self.tta, fast=fast, tile_step_size=tile_step_size,
            compile_network=compile_network, precision=precision if fast else None)
        self.warnings += warnings
        if isinstance(self.predictor, pred.FastPredictor):
            self.predictor.cpu_threads = self.nthreads
        self.parameters = self.model.parameters(self.folds)

    @property
    def provenance(self) -> dict[str, Any]:
        prov = self.model.provenance
        prov["folds_used"] = list(self.folds)
        return prov

    def segment(self, image: ImageLike, *, brain_mask: ImageLike | None = None) -> SegmentationResult:
        """Segment one skull-stripped image: ``measure(infer(prepare(image)))`` with this segmenter's
        threads (a shared worker runs the three stages of different images at once: engine/worker.py)."""
        with _torch_threads(self.nthreads):
            return self.measure(self.infer(self.prepare(image, brain_mask=brain_mask)))

    def prepare(self, image: ImageLike, *, brain_mask: ImageLike | None = None) -> PreparedImage:
        """Read, check and preprocess one image for the network (CPU work only; never touches the
        predictor's state, so it may run while another image is on the device)."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        img = _as_image(image, "image")
        data = img.get_fdata(dtype=np.float32)
        if brain_mask is not None:
            mask_img = _as_image(brain_mask, "brain mask")
            if mask_img.shape != img.shape or not np.allclose(mask_img.affine, img.affine,
                                                              atol=_AFFINE_TOLERANCE_MM):
                raise BidsClError("the brain mask is not on the image's grid (shape or affine differ)",
                                  EXIT_BAD_DATA)
            brain = np.asanyarray(mask_img.dataobj) > 0.5
            # The model expects a skull-stripped image with an exactly-zero background (SynthStrip).
            data = np.where(brain, data, np.float32(0.0))
        else:
            # nnU-Net's own brain region for skull-stripped input: non-zero voxels, holes filled.
            brain = ndimage.binary_fill_holes(data != 0)
        if not brain.any():
            raise BidsClError("the image is empty (no non-zero voxel inside the brain)", EXIT_BAD_DATA)
        fingerprint = (self.model.plans.get("foreground_intensity_properties_per_channel") or {}).get("0")
        ood = intensity_ood(data[brain], fingerprint)
        if ood:
            log.warning("%s", ood)
        timings["load"] = time.perf_counter() - start

        t = time.perf_counter()
        plan = orient.plan_reorientation(img.affine, img.shape, img.header.get_zooms()[:3],
                                         self.model.orientation)
        array = orient.to_nnunet_array(orient.to_model_order(data, plan))
        spacing = orient.nnunet_spacing(plan.model_zooms)
        del data
        tensor, seg, props = pred.preprocess(self.predictor, array, spacing)
        del array
        timings["preprocess"] = time.perf_counter() - t
        return PreparedImage(img=img, brain=brain, plan=plan, tensor=tensor,
                             tile_mask=torch.from_numpy(seg[0] >= 0), properties=props, ood=ood,
                             timings=timings, started=start)

    def infer(self, prepared: PreparedImage) -> LesionProbabilities:
        """The folds' sliding windows, the ensemble and the export (on the device when there is one):
        the lesion probability of the ensemble and of each fold, on the input image's grid."""
        timings = dict(prepared.timings)
        t = time.perf_counter()
        if isinstance(self.predictor, pred.FastPredictor):
            self.predictor.tile_mask = prepared.tile_mask
        logits = pred.fold_logits(self.predictor, self.parameters, prepared.tensor)
        prepared.tensor = None  # the preprocessed image is not needed any more: free it now
        timings["predict"] = time.perf_counter() - t

        t = time.perf_counter()
        plan, brain, props = prepared.plan, prepared.brain, prepared.properties
        back = lambda p: np.ascontiguousarray(  # noqa: E731
            orient.to_input_order(orient.from_nnunet_array(p), plan), dtype=np.float32)
        # The ensemble (nnU-Net's mean of fold logits) and each fold's export run where the logits
        # are (on the GPU when there is one); only each lesion-probability map comes back.
        mean_logits = pred.mean_logits(logits)
        probability = back(pred.lesion_probability(self.predictor, mean_logits, props, self.nthreads))
        probability[~brain] = 0.0
        fold_masks, fold_probs = [], []
        if len(logits) > 1:
            for fl in logits:
                p = back(pred.lesion_probability(self.predictor, fl, props, self.nthreads))
                p[~brain] = 0.0
                # The fold disagreement needs only each fold's lesions: a bool mask, a quarter of a float
                # map (5 folds at 0.5 mm: 0.27 GB instead of 1.1 GB), unless the caller keeps the maps. In
                # the shared worker these wait for the measure stage while the next image is on the
                # device, so they add to that image's memory. (Not the one-image peak: that is the
                # sliding window's, 6.2 GB either way for the paper model at 0.5 mm on 2 threads.)
                fold_masks.append(threshold_probability(p, self.threshold))
                if self.keep_fold_probabilities:
                    fold_probs.append(p)
                del p
        del logits, mean_logits
        timings["export"] = time.perf_counter() - t
        stats = dict(getattr(self.predictor, "last_stats", {}))
        return LesionProbabilities(img=prepared.img, probability=probability, fold_masks=fold_masks,
                                   folds=fold_probs,
                                   ood=prepared.ood, timings=timings, started=prepared.started,
                                   tiles_run=stats.get("tiles_run"), tiles_total=stats.get("tiles"))

    def measure(self, probabilities: LesionProbabilities) -> SegmentationResult:
        """Threshold, size filter, lesion table and the record (CPU work only)."""
        img, probability, fold_probs = probabilities.img, probabilities.probability, probabilities.folds
        timings = dict(probabilities.timings)
        t = time.perf_counter()
        min_voxels = min_size_in_voxels(self.min_lesion_size, voxel_volume_ul(img.affine))
        labels, n = postprocess(probability, threshold=self.threshold, connectivity=self.connectivity,
                                min_voxels=min_voxels)
        fold_labels = [postprocess_mask(m, connectivity=self.connectivity, min_voxels=min_voxels)
                       for m in probabilities.fold_masks]
        table = lesion_table(labels, n, probability, img.affine, fold_labels)
        timings["lesions"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - probabilities.started

        provenance = self.provenance
        record = SegmentationRecord(
            threshold=float(self.threshold), threshold_source=self.threshold_source,
            connectivity=int(self.connectivity),
            min_lesion_size=self.min_lesion_size if self.min_lesion_size is None or isinstance(
                self.min_lesion_size, (int, float, str)) else str(self.min_lesion_size),
            min_lesion_size_source=self.min_lesion_size_source, min_lesion_size_voxels=min_voxels,
            folds=list(self.folds), tta=self.tta, device=self.device.type, fast_path=self.fast,
            threads=self.nthreads,
            precision=getattr(self.predictor, "precision", "fp16" if self.device.type == "cuda" else "fp32"),
            orientation={"input": "".join(nib.aff2axcodes(img.affine)), "model": self.model.orientation},
            tiles_run=probabilities.tiles_run, tiles_total=probabilities.tiles_total,
            ood_warning=probabilities.ood,
            warnings=[w for w in [provenance.get("warning")] if w] + list(self.warnings),
            provenance=provenance, timings={k: round(v, 3) for k, v in timings.items()},
        )
        summary = {**summarize(table, record), "Warnings": record.warnings, "Timings": record.timings}
        keep_folds = self.keep_fold_probabilities and fold_probs
        return SegmentationResult(
            probability=orient.image_like(probability, img, np.float32),
            mask=orient.image_like((labels > 0).astype(np.uint8), img, np.uint8),
            lesions=table,
            record=record,
            summary=summary,
            provenance=provenance,
            labels=orient.image_like(labels, img, np.int32),
            fold_probabilities=[orient.image_like(p, img, np.float32) for p in fold_probs]
            if keep_folds else None,
            timings=timings,
        )


def segment(image: ImageLike, model: str | os.PathLike[str] | CLModel, *, device: str | torch.device = "auto",
            folds: Sequence[int | str] | None = None, tta: bool | None = None, threshold: float | None = None,
            min_lesion_size: int | float | str | None = None, connectivity: int = 26,
            nthreads: int | None = None, brain_mask: ImageLike | None = None,
            fast: bool = True) -> SegmentationResult:
    """Segment cortical lesions in one skull-stripped T1-weighted image (see ``CLSegmenter``).

    ``device="auto"`` uses CUDA when present, else the CPU (with a warning; test-time mirroring is then
    off unless ``tta=True``). ``folds=None`` uses every fold of the model. ``threshold=None``: the model's
    tuned threshold (bids_cl_model.json ``postprocessing``) where it has one, else 0.5.
    ``min_lesion_size``: voxels (int) or a volume string such as ``"3uL"``; None: the model's tuned minimum
    size where it has one, else every lesion is kept (0 keeps every lesion). ``brain_mask``: zero the image
    outside it (the model expects a zero background) and restrict lesions to it; default: the image's
    non-zero region.
    """
    return CLSegmenter(model, device=device, folds=folds, tta=tta, threshold=threshold,
                       min_lesion_size=min_lesion_size, connectivity=connectivity, nthreads=nthreads,
                       fast=fast).segment(image, brain_mask=brain_mask)
