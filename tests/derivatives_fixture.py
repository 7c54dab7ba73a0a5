"""Derivatives made by the real pipeline on tiny phantoms, for the report and group-level tests.

:func:`build_derivatives` writes a small BIDS dataset, a tiny nnU-Net model and a phantom template,
then processes every target the way a participant run does, without Nipype: discovery
(``bids_cl.utils.bids.discover``), the node functions of ``bids_cl.interfaces.steps`` (skull strip,
``bids_cl.engine.segment``, registration, resampling to the template) and the one writer
(``bids_cl.derivatives.writer``) for the derivatives, the participant logs, the target records, the crash
notes and the timings, in the order ``bids_cl.cli.workflow.run_participants`` calls them. Nothing here
writes a derivative by hand; what the design needs (an OOD image, a failed participant) comes from inputs
that make the real code produce it.

Design (``DESIGN``): sub-01 MP2RAGE 7T and sub-02 MP2RAGE 3T (UNIT1 + inversions), sub-03 MPRAGE 3T
(T1w), two sessions each, phantom lesions that persist and grow in number from ses-01 to ses-02;
sub-02 ses-02 is stored rescaled (x0.1, like a float export), so the engine flags it out of distribution;
sub-03's raw images are deleted after the run (the report falls back to the preprocessed image);
sub-04 fails: its ses-01 image is 2-D (discovery refuses it), its ses-02 image still has its noisy
background, which the ``none`` skull strip refuses; sub-05 is only in ``participants.tsv``.

The model (``bids_cl.engine.testing.intensity_weights``) marks voxels far darker than the brain: fold 0
below z = -3, fold 1 below z = -5, so the folds disagree on every lesion's extent (non-zero
uncertainty). Its trainer class does not exist, so the engine warns and falls back to nnUNetTrainer, a
real engine warning besides the model's own. The phantom template stands in for a TemplateFlow space
(``SPACE``), found through a private ``TEMPLATEFLOW_HOME`` during the build.

The build takes about a minute on two loaded cores; :func:`shared_derivatives` runs it once per test
session (also across pytest-xdist workers) and tests work on copies (:meth:`Derivatives.copy_output`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

SPACE = "Phantom"
MODEL_NAME = "bids_cl-fixture"
MODEL_WARNING = "fixture model for the tests: finds dark blobs in phantoms, not for real data"
TRAINER = "nnUNetTrainerBidsClFixture"  # no such class: the engine warns and builds with nnUNetTrainer
CONTAINER = "docker"  # BIDS_CL_CONTAINER as the Docker image sets it

SHAPE = (40, 40, 40)
VOXEL_MM = 2.0
BRAIN_RADII_MM = (30.0, 34.0, 28.0)
CORTEX_INNER = 0.8          # the outer 20 % of the brain radius is grey matter
WM, GM = 1000.0, 850.0
LESION_DEPTH = 600.0        # Gaussian dip of a lesion (cortical lesions are hypointense on T1w)
OOD_SCALE = 0.1             # the rescaled image of DESIGN's ood target


@dataclass(frozen=True)
class Participant:
    sequence: str                  # MP2RAGE (UNIT1 + inversions) or MPRAGE (T1w)
    field_t: float
    lesions: tuple[int, int]       # lesions in ses-01 and ses-02 (ses-01's persist)
    keep_raw: bool = True


DESIGN: dict[str, Participant] = {
    "01": Participant("MP2RAGE", 7.0, (4, 6)),
    "02": Participant("MP2RAGE", 3.0, (7, 9)),
    "03": Participant("MPRAGE", 3.0, (0, 1), keep_raw=False),
}
OOD_PREFIX = "sub-02_ses-02"
FAILED = "04"
MISSING = "05"
PARTICIPANTS = pd.DataFrame({
    "participant_id": [f"sub-0{i}" for i in range(1, 6)],
    "age": [34, 51, 28, 45, 39], "sex": ["F", "M", "F", "M", "F"],
    "site": ["A", "A", "B", "B", "A"], "diagnosis": ["RRMS", "SPMS", "RRMS", "PPMS", "RRMS"],
})
PARTICIPANTS_JSON = {
    "age": {"Description": "age at baseline", "Units": "year"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "site": {"Description": "acquisition site", "Levels": {"A": "site A", "B": "site B"}},
    "diagnosis": {"Description": "MS phenotype"},
}


@dataclass
class Derivatives:
    """Where the build put things, and what the design says the real pipeline made of them."""

    root: Path
    bids_dir: Path
    out_dir: Path
    template_t1w: Path
    template_mask: Path
    model_dir: Path
    run_uuid: str
    counts: dict[str, int] = field(default_factory=dict)   # prefix -> lesions found
    reasons: dict[str, str] = field(default_factory=dict)  # failed prefix -> one-line reason
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ood_prefix: str = OOD_PREFIX

    @property
    def templates(self) -> dict[str, tuple[Path, Path]]:
        return {SPACE: (self.template_t1w, self.template_mask)}

    def log_dir(self, participant: str) -> Path:
        from bids_cl.derivatives.spec import log_dir

        return log_dir(self.out_dir, participant, self.run_uuid)

    def copy_output(self, dest: Path) -> Derivatives:
        """A private copy of the output folder (modification times kept: the status logic reads them)."""
        out = Path(dest) / "out"
        shutil.copytree(self.out_dir, out)
        return dataclasses.replace(self, out_dir=out)

    def save(self, path: Path) -> None:
        values = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        path.write_text(json.dumps(values, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Derivatives:
        values = json.loads(path.read_text(encoding="utf-8"))
        paths = {f.name for f in dataclasses.fields(cls) if f.type in ("Path", Path)}
        return cls(**{k: Path(v) if k in paths else v for k, v in values.items()})


# ------------------------------------------------------------------------------------------------
# Phantom images (world coordinates, so every orientation and shift shows the same anatomy)


def _affine(axcodes: str) -> np.ndarray:
    from bids_cl.engine.testing import centred_affine

    return centred_affine(SHAPE, zooms=(VOXEL_MM,) * 3, axcodes=axcodes)


def _world(affine: np.ndarray) -> np.ndarray:
    ijk = np.indices(SHAPE).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T


def head_image(affine: np.ndarray, *, shift_mm: np.ndarray | None = None,
               lesions: list[tuple[np.ndarray, float]] = (), noise: float = 0.0,
               background: float = 0.0, seed: int = 0) -> nib.Nifti1Image:
    """A skull-stripped T1w-like brain (WM, a GM rim, dark lesions; zero outside) on ``affine``'s grid.

    ``lesions``: (centre relative to the brain centre in mm, sigma in mm). ``background`` > 0 adds a
    noisy non-zero background, as in an MP2RAGE UNI that was never skull-stripped.
    """
    rng = np.random.default_rng(seed)
    rel = _world(affine) - (np.zeros(3) if shift_mm is None else shift_mm)
    r = np.sqrt(((rel / np.array(BRAIN_RADII_MM)) ** 2).sum(1))
    brain = r < 1.0
    values = np.where(r < CORTEX_INNER, WM, GM)
    for centre, sigma in lesions:
        d2 = ((rel - centre) ** 2).sum(1)
        values = values - LESION_DEPTH * np.exp(-d2 / (2 * sigma ** 2))
    if noise:
        values = values + rng.normal(0, noise, values.shape)
    values = np.where(brain, values, 0.0)
    if background:
        values = np.where(brain, values, rng.uniform(0.2, 1.0, values.shape) * background)
    img = nib.Nifti1Image(np.clip(values, 0, None).reshape(SHAPE).astype(np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    return img


def lesion_plan(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, float]]:
    """``n`` lesions in the GM rim, at least 14 mm apart (separate components whatever their extent)."""
    placed: list[tuple[np.ndarray, float]] = []
    radii = np.array(BRAIN_RADII_MM)
    while len(placed) < n:
        direction = rng.normal(size=3)
        centre = direction / np.linalg.norm(direction) * radii * 0.9
        if all(np.linalg.norm(centre - c) >= 14.0 for c, _ in placed):
            placed.append((centre, float(rng.uniform(2.2, 3.2))))
    return placed


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_raw_dataset(bids_dir: Path) -> None:
    """The input dataset of the design (participants.tsv with age/sex/site/diagnosis)."""
    rng = np.random.default_rng(17)
    _write_json(bids_dir / "dataset_description.json",
                {"Name": "bids_cl report fixture", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    (bids_dir / "README").write_text("Phantoms for the bids_cl report and group tests.\n")
    PARTICIPANTS.to_csv(bids_dir / "participants.tsv", sep="\t", index=False)
    _write_json(bids_dir / "participants.json", PARTICIPANTS_JSON)
    native = _affine("LAS")  # i runs right to left: the figures must reorient themselves
    for sub, design in DESIGN.items():
        plan = lesion_plan(rng, max(design.lesions))
        for s_idx, n_lesions in enumerate(design.lesions):
            ses = f"0{s_idx + 1}"
            anat = bids_dir / f"sub-{sub}" / f"ses-{ses}" / "anat"
            prefix = f"sub-{sub}_ses-{ses}"
            meta = {"MagneticFieldStrength": design.field_t}
            img = head_image(native, shift_mm=rng.uniform(-3, 3, 3), lesions=plan[:n_lesions],
                             noise=10.0, seed=int(rng.integers(1 << 30)))
            if prefix == OOD_PREFIX:
                img = nib.Nifti1Image(np.asarray(img.dataobj) * OOD_SCALE, img.affine, img.header)
            if design.sequence == "MP2RAGE":
                meta["PulseSequenceType"] = "MP2RAGE"
                _save(img, anat / f"{prefix}_UNIT1.nii.gz")
                _write_json(anat / f"{prefix}_UNIT1.json", meta)
                for inv, ti in ((1, 0.8), (2, 2.7)):
                    stem = f"{prefix}_inv-{inv}_part-mag_MP2RAGE"
                    _save(head_image(native, noise=10.0, seed=inv), anat / f"{stem}.nii.gz")
                    _write_json(anat / f"{stem}.json", {**meta, "InversionTime": ti})
            else:
                _save(img, anat / f"{prefix}_T1w.nii.gz")
                _write_json(anat / f"{prefix}_T1w.json", meta)
    # sub-04: a single 2-D slice (discovery refuses it), and a UNI with its noisy background left on.
    anat = bids_dir / f"sub-{FAILED}"
    meta = {"MagneticFieldStrength": 3.0, "PulseSequenceType": "MP2RAGE"}
    flat = head_image(native, noise=10.0)
    _save(nib.Nifti1Image(np.asarray(flat.dataobj)[:, :, SHAPE[2] // 2], native),
          anat / "ses-01" / "anat" / f"sub-{FAILED}_ses-01_UNIT1.nii.gz")
    _save(head_image(native, noise=10.0, background=400.0),
          anat / "ses-02" / "anat" / f"sub-{FAILED}_ses-02_UNIT1.nii.gz")
    for ses in ("01", "02"):
        _write_json(anat / f"ses-{ses}" / "anat" / f"sub-{FAILED}_ses-{ses}_UNIT1.json", meta)


def write_template(home: Path) -> tuple[Path, Path]:
    """The phantom brain without lesions on a RAS grid, as a TemplateFlow space in ``home``."""
    folder = home / f"tpl-{SPACE}"
    img = head_image(_affine("RAS"))
    t1w = _save(img, folder / f"tpl-{SPACE}_res-01_desc-brain_T1w.nii.gz")
    mask = _save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine),
                 folder / f"tpl-{SPACE}_res-01_desc-brain_mask.nii.gz")
    return t1w, mask


def write_model(dest: Path) -> Path:
    """Two folds of the pointwise dark-voxel model, disagreeing on lesion extent."""
    from bids_cl.engine import testing as T

    plans = T.tiny_plans(norm=False, spacing=(VOXEL_MM,) * 3)
    dataset = T.tiny_dataset_json()
    return T.write_model_folder(
        dest, plans, dataset,
        {0: T.intensity_weights(plans, dataset, z_threshold=3.0),
         1: T.intensity_weights(plans, dataset, z_threshold=5.0)},
        trainer=TRAINER,
        settings={"name": MODEL_NAME, "description": "pointwise dark-voxel detector (tests)",
                  "warning": MODEL_WARNING, "orientation": "RAS"})


# ------------------------------------------------------------------------------------------------
# One participant run, as bids_cl.cli.workflow.run_participants and the graph of workflows/base.py do it


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        yield


def _process_target(config: Any, item: Any, work: Path, log_dir: Path) -> Any:
    """init_target_wf's nodes for one target (skull strip -> segment -> register -> resample ->
    write); returns the TargetRecord the nodes leave for the runner."""
    from bids_cl.derivatives import writer
    from bids_cl.derivatives.records import (
        STATUS_FAILED,
        STATUS_OK,
        SegmentationRecord,
        SkullStripRecord,
        TargetRecord,
    )
    from bids_cl.errors import BidsClError
    from bids_cl.interfaces import steps

    work = work / item.prefix
    stage = "skull stripping"
    try:
        strip = steps.skull_strip_files(item.target, str(work / "skullstrip"), inv2_file=item.inv2,
                                        strategy=config.skull_strip,
                                        is_mp2rage=item.sequence == "MP2RAGE", nthreads=1)
        stage = "segmentation"
        # The runner verified the model once for the run (build_derivatives), as resolve_run does.
        seg = steps.segment_files(strip["brain"], str(work / "segment"), model=config.model,
                                  model_verified=True, mask_file=strip["mask"], device=config.device,
                                  folds=config.folds,
                                  tta=False if config.disable_tta else None,
                                  threshold=config.threshold, min_lesion_size=config.min_lesion_size,
                                  connectivity=config.connectivity, nthreads=1)
        templates, infos = {}, []
        for space in config.output_spaces:
            stage = "registration"
            reg = steps.register_files(strip["brain"], str(work / f"register_{space}"), space=space,
                                       seed=config.random_seed, nthreads=1, sloppy=config.sloppy)
            stage = "resampling to the template"
            warped = steps.to_template_files(seg["mask"], seg["probseg"], seg["lesions"], reg["info"],
                                             str(work / f"resample_{space}"))
            templates[space] = {"mask": warped["mask"], "probseg": warped["probseg"],
                                "xfm": reg["xfm"], "lesions_tsv": warped["lesions"],
                                "t1w": reg["warped"]}
            infos.append(reg["info"])
        stage = "writing derivatives"
        skullstrip = SkullStripRecord.read(strip["info"])
        segmentation = SegmentationRecord.read(seg["info"])
        written = writer.write_target_derivatives(
            config.output_dir, config.bids_dir, item, brain=strip["brain"], brain_mask=strip["mask"],
            skullstrip=skullstrip, probseg=seg["probseg"], lesion_mask=seg["mask"],
            lesions_tsv=seg["lesions"], segmentation=segmentation, templates=templates)
        record = TargetRecord(
            prefix=item.prefix, status=STATUS_OK,
            timings=steps.stage_timings(skullstrip, segmentation, infos),
            outputs=[p.relative_to(config.output_dir).as_posix() for p in written])
    except BidsClError as exc:
        record = TargetRecord(prefix=item.prefix, status=STATUS_FAILED, exit_code=exc.code,
                              stage=stage, reason=" ".join(exc.message.split()))
    writer.write_target_record(log_dir, record)
    return record


def build_derivatives(root: Path) -> Derivatives:
    """Input dataset, model, template and the participant run's output folder under ``root``."""
    from bids_cl.config import ResolvedRun, RunConfig
    from bids_cl.derivatives import writer
    from bids_cl.engine import load_model
    from bids_cl.utils.bids import discover, make_layout

    root = Path(root).absolute()
    bids_dir, out_dir, work = root / "bids", root / "out", root / "work"
    write_raw_dataset(bids_dir)
    template_t1w, template_mask = write_template(root / "templateflow")
    model_dir = write_model(root / "model")
    config = RunConfig(bids_dir=bids_dir, output_dir=out_dir, work_dir=work, model=str(model_dir),
                       device="cpu", skull_strip="none", output_spaces=[SPACE], sloppy=True,
                       nprocs=1, omp_nthreads=1, skip_bids_validation=True)
    resolved = ResolvedRun(device="cpu", nprocs=1, omp_nthreads=1, mem_mb=None, model=str(model_dir),
                           random_seed=config.random_seed)
    ds = Derivatives(root, bids_dir, out_dir, template_t1w, template_mask, model_dir, config.run_uuid)

    with _environment(TEMPLATEFLOW_HOME=str(root / "templateflow"), BIDS_CL_CONTAINER=CONTAINER):
        found = discover(make_layout(bids_dir))
        items, problems = found.items, found.problems
        participants = sorted({i.participant for i in [*items, *problems]})
        writer.write_dataset_description(out_dir, bids_dir, load_model(str(model_dir)).provenance)
        log_dirs = {p: writer.write_participant_log(
            out_dir, p, config.run_uuid, config_toml=config.to_toml(resolved),
            items=[i for i in [*items, *problems] if i.participant == p]) for p in participants}
        records = {i.prefix: _process_target(config, i, work, log_dirs[i.participant]) for i in items}
        for problem in problems:
            writer.write_crash_note(log_dirs[problem.participant], problem.prefix, problem.problem,
                                    problem.problem_code, [])
            ds.reasons[problem.prefix] = problem.problem
        for item in items:
            record = records[item.prefix]
            if not record.ok:
                writer.write_crash_note(log_dirs[item.participant], item.prefix, record.reason or "",
                                        record.exit_code, [])
                ds.reasons[item.prefix] = record.reason or ""
        for participant, log_dir in log_dirs.items():
            writer.write_timings(log_dir, {i.prefix: records[i.prefix].timings for i in items
                                           if i.participant == participant and records[i.prefix].ok})

    _check_design(ds, items, problems, records)
    for sub, design in DESIGN.items():  # the user deleted the raw images after the run
        if not design.keep_raw:
            for path in (bids_dir / f"sub-{sub}").rglob("*.nii.gz"):
                path.unlink()
    shutil.rmtree(work)
    return ds


def _check_design(ds: Derivatives, items: list[Any], problems: list[Any], records: dict[str, Any]) -> None:
    """The real pipeline did what the design asks, or the tests built on it would prove nothing."""
    from bids_cl.derivatives.reader import collect_targets

    failed = {p.prefix for p in problems} | {p for p, r in records.items() if not r.ok}
    assert failed == {f"sub-{FAILED}_ses-01", f"sub-{FAILED}_ses-02"}, ds.reasons
    for sub, design in DESIGN.items():
        targets = collect_targets(ds.out_dir, sub)
        assert [t.prefix for t in targets] == [f"sub-{sub}_ses-0{s}" for s in (1, 2)]
        for target, expected in zip(targets, design.lesions, strict=True):
            found = len(target.lesions())
            assert found == expected == target.summary["LesionCount"], (target.prefix, found, expected)
            assert bool(target.summary["OODWarning"]) == (target.prefix == ds.ood_prefix)
            ds.counts[target.prefix] = found
        ds.ok.append(sub)
    ds.failed.append(FAILED)
    ds.missing.append(MISSING)


def shared_derivatives(tmp_path_factory: pytest.TempPathFactory) -> Derivatives:
    """:func:`build_derivatives` once per test session, shared by the pytest-xdist workers of a run."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    root = base / "real_derivatives"
    with FileLock(str(base / "real_derivatives.lock")):
        done = root / "derivatives.json"
        if not done.is_file():
            if root.exists():
                shutil.rmtree(root)  # an interrupted build
            build_derivatives(root).save(root / "derivatives.tmp")
            (root / "derivatives.tmp").replace(done)
        return Derivatives.load(done)
