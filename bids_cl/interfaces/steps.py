"""Plain, file-level functions behind the Nipype interfaces (unit-testable without Nipype).

Each takes input paths and an output folder, calls the numeric code in ``bids_cl.preproc`` /
``bids_cl.engine``, and writes its results as files whose names the interfaces return; what a stage
decided travels as a record of :mod:`bids_cl.derivatives.records`. Anticipated failures are
``BidsClError`` with an exit code; the interfaces record them for the runner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import nibabel as nib
import pandas as pd

from bids_cl.derivatives.records import SegmentationRecord, SkullStripRecord
from bids_cl.derivatives.spec import TEMPLATE_COLUMNS
from bids_cl.utils.io import atomic_save_nifti, atomic_write_json, atomic_write_text

log = logging.getLogger("bids_cl.workflow")


def skull_strip_files(
    in_file: str, out_dir: str, *, inv2_file: str | None = None, strategy: str = "auto",
    synthstrip_model: str | None = None, is_mp2rage: bool = False, nthreads: int = 1,
) -> dict[str, str]:
    """Skull-strip ``in_file``; write brain, mask and an info JSON into ``out_dir``."""
    from bids_cl.preproc import skull_strip

    start = time.perf_counter()
    out = Path(out_dir)
    t1w = nib.load(in_file)
    inv2 = nib.load(inv2_file) if inv2_file else None
    result = skull_strip(t1w, strategy=strategy, inv2_img=inv2, synthstrip_model=synthstrip_model,
                         nthreads=nthreads, is_mp2rage=is_mp2rage)
    brain = atomic_save_nifti(result.brain, out / "brain.nii.gz")
    mask = atomic_save_nifti(result.mask, out / "brain_mask.nii.gz")
    record = SkullStripRecord(
        strategy=result.strategy, detail=result.detail, warnings=list(result.warnings),
        used_inv2=bool(inv2_file) and "inv2" in str(result.strategy).lower(),
        seconds=round(time.perf_counter() - start, 3),
    )
    info_path = atomic_write_text(out / "skullstrip.json", record.to_json())
    return {"brain": str(brain), "mask": str(mask), "info": str(info_path)}


def segment_files(
    brain_file: str, out_dir: str, *, model: str, mask_file: str | None = None,
    device: str = "auto", folds: list[int] | None = None, tta: bool | None = None,
    threshold: float | None = None, min_lesion_size: str | None = None, connectivity: int = 26,
    nthreads: int | None = None, model_verified: bool = False, worker: str | None = None,
) -> dict[str, str]:
    """Run the nnU-Net engine on a skull-stripped image; write probseg, mask, table and the record.

    ``model_verified``: the run's parent verified this model's lock (once per run), so it is not hashed
    again here; its checkpoints are still read with the safe loader. ``worker``: the address of the
    run's shared segmentation worker (``bids_cl.engine.worker``), which segments the image with the
    model it loaded once; where it cannot be reached this node segments the image itself and the
    target's warnings say so.
    """
    from bids_cl.engine.worker import SegmenterSettings, WorkerUnavailable, request_segmentation

    start = time.perf_counter()
    out = Path(out_dir)
    settings = SegmenterSettings(
        model=model, device=device, folds=None if folds is None else tuple(folds), tta=tta,
        threshold=threshold, min_lesion_size=min_lesion_size, connectivity=connectivity,
        nthreads=nthreads, model_verified=model_verified)
    result, fallback, set_up = None, None, {}
    if worker:
        try:
            result = request_segmentation(worker, settings, brain_file, mask_file)
        except WorkerUnavailable as exc:
            fallback = (f"the run's shared segmentation worker was not reachable ({exc}): this image "
                        "was segmented by its own node")
            log.warning("%s: %s", brain_file, fallback)
    if result is None:
        segmenter = settings.build()
        set_up = {"load_model": round(time.perf_counter() - start, 3)}  # the worker reports its own
        result = segmenter.segment(brain_file, brain_mask=mask_file)
    probseg = atomic_save_nifti(result.probability, out / "probseg.nii.gz")
    lesion_mask = atomic_save_nifti(result.mask, out / "lesion_mask.nii.gz")
    lesions_tsv = atomic_write_text(out / "lesions.tsv",
                                    result.lesions.to_csv(sep="\t", index=False))
    record = dataclasses.replace(
        result.record, warnings=[*result.record.warnings, *([fallback] if fallback else [])],
        timings={**set_up, **result.record.timings, "node": round(time.perf_counter() - start, 3)})
    info_path = atomic_write_text(out / "segment.json", record.to_json())
    return {"probseg": str(probseg), "mask": str(lesion_mask), "lesions": str(lesions_tsv),
            "info": str(info_path)}


def register_files(brain_file: str, out_dir: str, *, space: str, seed: int, nthreads: int = 1,
                   sloppy: bool = False) -> dict[str, str]:
    """Register the skull-stripped image to a template; write the composite transform."""
    from bids_cl.preproc import get_template, register_to_template

    start = time.perf_counter()
    out = Path(out_dir)
    template = get_template(space)
    # Paths, not loaded images: the antspyx child reads the files as they are (images would be saved
    # again into a temporary folder first, three gzip writes per registration).
    result = register_to_template(
        brain_file, str(template.t1w), template_mask=str(template.mask) if template.mask else None,
        seed=seed, nthreads=nthreads, out_prefix=str(out / "reg_"), sloppy=sloppy,
    )
    info = {
        "space": space,
        "template": str(template.t1w),
        "template_source": template.source,
        "result": dataclasses.asdict(result),
        "seconds": round(time.perf_counter() - start, 3),
    }
    info_path = atomic_write_json(out / "registration.json", info)
    return {"xfm": str(result.composite_h5), "info": str(info_path),
            "warped": str(result.warped_moving)}


def to_template_files(mask_file: str, probseg_file: str, lesions_tsv: str, registration_info: str,
                      out_dir: str) -> dict[str, str]:
    """Warp lesion mask (nearest) and probability (linear) to the template; add template coords."""
    from bids_cl.preproc import apply_to_template, points_to_template
    from bids_cl.preproc.registration import RegistrationResult

    out = Path(out_dir)
    info = json.loads(Path(registration_info).read_text())
    result = RegistrationResult(**info["result"])
    template = nib.load(info["template"])
    warped_mask = apply_to_template(nib.load(mask_file), result, template,
                                    interpolation="nearestNeighbor")
    warped_prob = apply_to_template(nib.load(probseg_file), result, template,
                                    interpolation="linear")
    mask_path = atomic_save_nifti(warped_mask, out / "template_mask.nii.gz")
    prob_path = atomic_save_nifti(warped_prob, out / "template_probseg.nii.gz")
    lesions = pd.read_csv(lesions_tsv, sep="\t")
    if len(lesions):
        xyz = lesions[["centroid_x", "centroid_y", "centroid_z"]].to_numpy(dtype=float)
        coords = points_to_template(xyz, result)
        for c, values in zip(TEMPLATE_COLUMNS, coords.T, strict=True):
            lesions[c] = values
    else:
        for c in TEMPLATE_COLUMNS:
            lesions[c] = pd.Series(dtype=float)
    tsv = atomic_write_text(out / "lesions_template.tsv",
                            lesions.to_csv(sep="\t", index=False))
    return {"mask": str(mask_path), "probseg": str(prob_path), "lesions": str(tsv)}


def stage_timings(skullstrip: SkullStripRecord, segmentation: SegmentationRecord,
                  registration_infos: list[str]) -> dict[str, float]:
    """``{stage: seconds}`` of one target from its stage records (cached stages keep their first time)."""
    timings = {"skullstrip": skullstrip.seconds}
    engine = dict(segmentation.timings)
    timings["segment"] = engine.pop("node", sum(engine.values()))
    timings.update({f"segment.{step}": seconds for step, seconds in engine.items()})
    for path in registration_infos:
        info = json.loads(Path(path).read_text())
        timings[f"register_{info['space']}"] = info["seconds"]
    return timings
