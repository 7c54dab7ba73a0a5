"""BIDS dataset + manual CL masks -> nnU-Net v2 raw dataset (one channel ``T1w``, labels background/CL).

The images are the targets ``bids_cl participant`` finds (``bids_cl.utils.bids.discover``), with the
prefix, sequence and INV2 it gives them; each is paired with the manual mask of the same prefix. Every
training image goes through the same steps the participant workflow applies before the engine sees
it: skull stripping (``bids_cl.preproc.skull_strip``, or a shortcut, see ``SKULL_STRIP_SHORTCUTS``), zeroing
of the background, then the engine's reorientation to the closest canonical (RAS) grid. A model trained on
these files therefore sees at inference exactly the kind of array it was trained on.

All imports inside this package are absolute on purpose: nnU-Net's external trainer lookup may import
modules of a folder as top-level modules, where relative imports fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bids_cl.errors import (
    EXIT_BAD_DATA,
    EXIT_FAILURE,
    EXIT_MISSING_INPUT,
    EXIT_NO_DATA_SELECTED,
    BidsClError,
)
from bids_cl.preproc import STRATEGIES, skull_strip
from bids_cl.utils.bids import Discovery, WorkItem, discover, make_layout, strip_prefix

CHANNEL_NAME = "T1w"
LABELS = {"background": 0, "CL": 1}
FILE_ENDING = ".nii.gz"

# Strategies handled here rather than by bids_cl.preproc.skull_strip.
#   truth-mask: use the annotators' (or phantom generator's) <prefix>_desc-brain_mask from the labels
#               folder. A training shortcut: it is not what the participant workflow does.
#   none:       the images are already skull stripped (background exactly 0).
SKULL_STRIP_SHORTCUTS = ("truth-mask", "none")


@dataclass
class TrainingCase:
    """One annotated image: the unit nnU-Net calls a case."""

    case_id: str
    participant: str
    session: str | None
    image: Path
    label: Path
    sequence: str  # "MP2RAGE" | "MPRAGE"
    inv2: Path | None = None
    brain_mask: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def preproc_strategies() -> tuple[str, ...]:
    """The ``--skull-strip`` choices: the participant workflow's strategies plus the training shortcuts."""
    return tuple(dict.fromkeys(STRATEGIES + SKULL_STRIP_SHORTCUTS))


def usable_targets(found: Discovery, log: Callable[[str], None]) -> list[WorkItem]:
    """The targets discovery found usable; one warning line for each target or participant it could not use.

    The only reader of what ``discover`` returns besides the usable items' fields: raises discovery's own
    code (as ``bids_cl participant`` does) when nothing at all is usable.
    """
    for problem in found.problems:
        log(f"warning: skipped: {problem.problem}")
    if not found.items:
        first = found.problems[0]
        more = f" (and {len(found.problems) - 1} more problem(s))" if len(found.problems) > 1 else ""
        raise BidsClError(f"no usable image: {first.problem}{more}", first.problem_code or EXIT_FAILURE)
    return list(found.items)


def _index_by_name(folder: Path, pattern: str) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.rglob(pattern))}


def _by_prefix(index: dict[str, Path], prefix: str, what: str) -> Path | None:
    return index.get(f"{prefix}_{what}.nii.gz") or index.get(f"{prefix}_{what}.nii")


def _mask_prefix(name: str) -> str:
    return name.split("_label-CL_mask.nii")[0]


def find_cases(bids_dir: Path, labels_dir: Path, *,
               participants: Sequence[str] | None = None,
               sequences: Sequence[str] | None = None,
               log: Callable[[str], None] = print) -> tuple[list[TrainingCase], list[str]]:
    """Pair each target that ``bids_cl participant`` would segment with ``<prefix>_label-CL_mask``.

    The targets come from bids_cl's own discovery (``bids_cl.utils.bids.discover``: its pybids queries,
    MP2RAGE evidence, prefix de-duplication and INV2 pairing), so a case is named, typed and skull
    stripped as inference will treat that image. Masks are looked up by the target's prefix anywhere
    under ``labels_dir``. Targets discovery cannot use are skipped with a warning (``log``); masks whose
    prefix names no usable target of the selected participants are reported the same way.

    Returns the cases and the prefixes of images that have no manual mask (skipped: an image without a
    mask is *unannotated*, not lesion-free; lesion-free images need an empty mask file).
    """
    bids_dir, labels_dir = Path(bids_dir), Path(labels_dir)
    if not bids_dir.is_dir():
        raise BidsClError(f"BIDS dataset not found: {bids_dir}", EXIT_MISSING_INPUT)
    if not labels_dir.is_dir():
        raise BidsClError(f"labels folder not found: {labels_dir}", EXIT_MISSING_INPUT)
    wanted = strip_prefix(list(participants or []), "sub-")
    targets = usable_targets(discover(make_layout(bids_dir), participant_label=wanted), log)

    labels = _index_by_name(labels_dir, "*_label-CL_mask.nii*")
    brains = _index_by_name(labels_dir, "*_desc-brain_mask.nii*")
    cases, unannotated = [], []
    for item in targets:
        if sequences and item.sequence not in sequences:
            continue
        label = _by_prefix(labels, item.prefix, "label-CL_mask")
        if label is None:
            unannotated.append(item.prefix)
            continue
        cases.append(TrainingCase(
            case_id=item.prefix, participant=item.participant, session=item.session, image=Path(item.target),
            label=label, sequence=item.sequence, inv2=Path(item.inv2) if item.inv2 else None,
            brain_mask=_by_prefix(brains, item.prefix, "desc-brain_mask")))

    # A mask named after no target (a typo, or a prefix guessed differently from bids_cl's) is never used.
    known = {item.prefix for item in targets}
    orphans = sorted(prefix for prefix in map(_mask_prefix, labels) if prefix not in known
                     and (wanted is None or prefix.split("_")[0].removeprefix("sub-") in wanted))
    if orphans:
        log(f"warning: {len(orphans)} manual mask(s) match no image bids_cl would segment (by prefix): "
            + ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
    if not cases:
        raise BidsClError(f"no image in {bids_dir} has a <prefix>_label-CL_mask.nii.gz in {labels_dir}",
                          EXIT_NO_DATA_SELECTED)
    return cases, unannotated


def _skull_strip(case: TrainingCase, img: nib.Nifti1Image, strategy: str, *, nthreads: int,
                 synthstrip_model: str | None) -> tuple[np.ndarray, str, list[str]]:
    """Brain mask (bool array on ``img``'s grid), the strategy that ran, and warnings."""
    if strategy == "truth-mask":
        if case.brain_mask is None:
            raise BidsClError(f"--skull-strip truth-mask: no {case.case_id}_desc-brain_mask.nii.gz in the "
                              "labels folder", EXIT_MISSING_INPUT)
        mask = np.asanyarray(nib.load(str(case.brain_mask)).dataobj) > 0
        return mask, "truth-mask", []
    if strategy == "none":
        return np.asarray(img.dataobj) != 0, "none", []
    inv2 = nib.load(str(case.inv2)) if case.inv2 is not None else None
    res = skull_strip(img, strategy=strategy, inv2_img=inv2, synthstrip_model=synthstrip_model,
                      nthreads=nthreads, is_mp2rage=case.sequence == "MP2RAGE")
    mask = np.asanyarray(res.mask.dataobj) > 0
    return mask, str(res.strategy), list(res.warnings)


def _check_same_grid(a: nib.spatialimages.SpatialImage, b: nib.spatialimages.SpatialImage,
                     what: str) -> None:
    if a.shape[:3] != b.shape[:3] or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise BidsClError(f"{what} is not on the image grid (shape {b.shape} vs {a.shape})", EXIT_BAD_DATA)


def convert_case(case: TrainingCase, images_dir: Path, labels_dir: Path, *, skull_strip: str,
                 nthreads: int = 1, synthstrip_model: str | None = None) -> dict[str, Any]:
    """Write ``<case>_0000.nii.gz`` (skull-stripped, RAS) and ``<case>.nii.gz`` (0/1, RAS)."""
    img = nib.load(str(case.image))
    if img.ndim == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if img.ndim != 3:
        raise BidsClError(f"{case.image} is not 3D (shape {img.shape})", EXIT_BAD_DATA)
    label = nib.load(str(case.label))
    _check_same_grid(img, label, f"manual mask {case.label.name}")

    mask, strategy, warnings = _skull_strip(case, img, skull_strip, nthreads=nthreads,
                                            synthstrip_model=synthstrip_model)
    if mask.shape != img.shape[:3] or not mask.any():
        raise BidsClError(f"{case.case_id}: skull stripping ({strategy}) gave an empty or mis-sized mask",
                          EXIT_BAD_DATA)
    # nnU-Net normalises inside the non-zero region (use_mask_for_norm): the background must be exactly 0,
    # as in the brain the participant workflow hands to the engine.
    brain = np.where(mask, np.asarray(img.get_fdata(dtype=np.float32)), 0).astype(np.float32)
    lesions = (np.asanyarray(label.dataobj) > 0).astype(np.uint8)

    # The engine reorients to the closest canonical (RAS) grid before nnU-Net; so do we.
    brain_img = nib.as_closest_canonical(nib.Nifti1Image(brain, img.affine))
    label_img = nib.as_closest_canonical(nib.Nifti1Image(lesions, img.affine))
    brain_img.set_data_dtype(np.float32)
    label_img.set_data_dtype(np.uint8)
    nib.save(brain_img, str(images_dir / f"{case.case_id}_0000{FILE_ENDING}"))
    nib.save(label_img, str(labels_dir / f"{case.case_id}{FILE_ENDING}"))
    case.record = {"skull_strip": strategy, "warnings": warnings, "lesion_voxels": int(lesions.sum()),
                   "brain_voxels": int(mask.sum()), "zooms": [float(z) for z in img.header.get_zooms()[:3]]}
    return case.record


def write_dataset_json(raw_dataset_dir: Path, num_training: int, *, description: str = "") -> Path:
    """nnU-Net's dataset.json: one ``T1w`` channel, labels background/CL, ``.nii.gz``."""
    meta = {
        "channel_names": {"0": CHANNEL_NAME},
        "labels": dict(LABELS),
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
        "name": raw_dataset_dir.name,
        "description": description or "bids_cl cortical lesion training data (skull-stripped, RAS)",
    }
    out = raw_dataset_dir / "dataset.json"
    out.write_text(json.dumps(meta, indent=2) + "\n")
    return out


def build_raw_dataset(cases: Iterable[TrainingCase], raw_dataset_dir: Path, *, skull_strip: str,
                      nthreads: int = 1, synthstrip_model: str | None = None,
                      log: Any = print) -> list[TrainingCase]:
    """Convert all cases into ``raw_dataset_dir`` (imagesTr/labelsTr/dataset.json + bids_cl_cases.json)."""
    cases = list(cases)
    images_dir, labels_dir = raw_dataset_dir / "imagesTr", raw_dataset_dir / "labelsTr"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases, 1):
        rec = convert_case(case, images_dir, labels_dir, skull_strip=skull_strip, nthreads=nthreads,
                           synthstrip_model=synthstrip_model)
        log(f"[{i}/{len(cases)}] {case.case_id}: {case.sequence}, skull strip {rec['skull_strip']}, "
            f"{rec['lesion_voxels']} lesion voxels")
    write_dataset_json(raw_dataset_dir, len(cases))
    # Who is who: the split is made per participant from this file, and it documents the conversion.
    (raw_dataset_dir / "bids_cl_cases.json").write_text(
        json.dumps([c.to_dict() for c in cases], indent=2) + "\n")
    return cases
