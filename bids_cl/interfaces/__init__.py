"""Thin Nipype interfaces over the plain functions in :mod:`bids_cl.interfaces.steps`.

Every interface records how its target ended (:class:`~bids_cl.derivatives.records.TargetRecord`) in
``record_file``: the node that fails writes the exit code and the reason, the last node writes success,
timings and outputs. The runner reads those records; it never parses Nipype's crash files for them.
``record_file`` is excluded from Nipype's hash (it names this run's log folder), so cached nodes stay
cached across runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from bids_cl.config import SKULL_STRIP_CHOICES
from bids_cl.derivatives.records import (
    STATUS_FAILED,
    STATUS_OK,
    SegmentationRecord,
    SkullStripRecord,
    TargetRecord,
)
from bids_cl.errors import EXIT_FAILURE, as_bids_cl_error
from bids_cl.interfaces import steps


def _opt(value):
    return value if isdefined(value) else None


class _RecordedInputSpec(BaseInterfaceInputSpec):
    record_file = traits.Str(nohash=True, desc="this target's record (TargetRecord JSON) in the run's log")
    target_prefix = traits.Str(desc="the target's prefix (names the record)")


class _RecordedInterface(SimpleInterface):
    """A bids_cl step whose failure is recorded for the runner (exit code and one-line reason)."""

    stage = "step"

    def _run_interface(self, runtime):
        try:
            self._run_step(runtime)
        except Exception as exc:
            failure = as_bids_cl_error(exc)
            self._record_failure(failure.code, failure.message)
            if isinstance(exc, OSError) and failure.code != EXIT_FAILURE:
                raise failure from None  # the output cannot be written: say so, as the record does
            raise
        return runtime

    def _run_step(self, runtime) -> None:  # pragma: no cover - every interface defines it
        raise NotImplementedError

    def _write_record(self, record: TargetRecord) -> None:
        from bids_cl.utils.io import atomic_write_text

        if isdefined(self.inputs.record_file) and self.inputs.record_file:
            atomic_write_text(Path(self.inputs.record_file), record.to_json())

    def _record_failure(self, code: int, reason: str) -> None:
        prefix = self.inputs.target_prefix if isdefined(self.inputs.target_prefix) else ""
        try:
            self._write_record(TargetRecord(prefix=prefix, status=STATUS_FAILED, exit_code=code,
                                            stage=self.stage, reason=" ".join(str(reason).split())))
        except OSError:  # the disk that failed the step may refuse the record too: the runner copes
            pass


class _SkullStripInputSpec(_RecordedInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1-weighted image to strip")
    inv2_file = File(exists=True, desc="MP2RAGE second inversion (mask source for inv2/auto)")
    strategy = traits.Enum(*SKULL_STRIP_CHOICES, usedefault=True)
    synthstrip_model = File(exists=True, desc="SynthStrip weights")
    is_mp2rage = traits.Bool(False, usedefault=True)
    nthreads = traits.Int(1, usedefault=True)


class _SkullStripOutputSpec(TraitedSpec):
    out_brain = File(exists=True)
    out_mask = File(exists=True)
    out_info = File(exists=True, desc="JSON: strategy, detail, warnings, seconds")


class SkullStrip(_RecordedInterface):
    """Skull stripping with the strategy the user chose (see bids_cl.preproc.skull_strip)."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec
    stage = "skull stripping"

    def _run_step(self, runtime) -> None:
        files = steps.skull_strip_files(
            self.inputs.in_file, runtime.cwd, inv2_file=_opt(self.inputs.inv2_file),
            strategy=self.inputs.strategy, synthstrip_model=_opt(self.inputs.synthstrip_model),
            is_mp2rage=self.inputs.is_mp2rage, nthreads=self.inputs.nthreads,
        )
        self._results.update(out_brain=files["brain"], out_mask=files["mask"],
                             out_info=files["info"])


class _SegmentInputSpec(_RecordedInputSpec):
    in_file = File(exists=True, mandatory=True, desc="skull-stripped T1-weighted image")
    mask_file = File(exists=True, desc="brain mask (tiles outside it are skipped)")
    model = traits.Str(mandatory=True, desc="registry name or model path")
    model_verified = traits.Bool(False, usedefault=True, nohash=True,
                                 desc="the run verified the model's lock already (once per run)")
    device = traits.Enum("auto", "cuda", "cpu", usedefault=True)
    folds = traits.Either(None, traits.List(traits.Int), default=None, usedefault=True)
    tta = traits.Either(None, traits.Bool, default=None, usedefault=True)
    threshold = traits.Either(None, traits.Float, default=None, usedefault=True,
                              desc="None: the model's tuned threshold, else 0.5")
    min_lesion_size = traits.Either(None, traits.Str, default=None, usedefault=True,
                                    desc="None: the model's tuned minimum size, else keep every lesion")
    connectivity = traits.Enum(26, 18, 6, usedefault=True)
    nthreads = traits.Int(1, usedefault=True)
    # Nipype's MultiProc counts a node as GPU work when its interface sets use_gpu: one GPU is then
    # never shared by two segmentation nodes (n_gpu_procs). A scheduling hint, so not hashed: the
    # results do not depend on it (the device does, and is hashed).
    use_gpu = traits.Bool(False, usedefault=True, nohash=True)
    worker = traits.Str(nohash=True, desc="address of the run's shared segmentation worker "
                        "(bids_cl.engine.worker); unset: this node loads the model itself")


class _SegmentOutputSpec(TraitedSpec):
    out_probseg = File(exists=True)
    out_mask = File(exists=True)
    out_lesions = File(exists=True)
    out_info = File(exists=True)


class Segment(_RecordedInterface):
    """nnU-Net v2 cortical lesion segmentation (bids_cl.engine.segment)."""

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec
    stage = "segmentation"

    def _run_step(self, runtime) -> None:
        files = steps.segment_files(
            self.inputs.in_file, runtime.cwd, model=self.inputs.model,
            mask_file=_opt(self.inputs.mask_file), device=self.inputs.device,
            folds=self.inputs.folds, tta=self.inputs.tta, threshold=self.inputs.threshold,
            min_lesion_size=self.inputs.min_lesion_size,
            connectivity=int(self.inputs.connectivity), nthreads=self.inputs.nthreads,
            model_verified=self.inputs.model_verified, worker=_opt(self.inputs.worker),
        )
        self._results.update(out_probseg=files["probseg"], out_mask=files["mask"],
                             out_lesions=files["lesions"], out_info=files["info"])


class _RegisterInputSpec(_RecordedInputSpec):
    in_file = File(exists=True, mandatory=True, desc="skull-stripped T1-weighted image")
    space = traits.Str(mandatory=True)
    seed = traits.Int(mandatory=True)
    nthreads = traits.Int(1, usedefault=True)
    sloppy = traits.Bool(False, usedefault=True)


class _RegisterOutputSpec(TraitedSpec):
    out_xfm = File(exists=True, desc="composite T1w -> template transform (.h5)")
    out_info = File(exists=True)
    out_warped = File(exists=True, desc="the skull-stripped image in template space")


class RegisterToTemplate(_RecordedInterface):
    """antspyx affine + SyN registration to a TemplateFlow template (fixed seed)."""

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec
    stage = "registration"

    def _run_step(self, runtime) -> None:
        files = steps.register_files(self.inputs.in_file, runtime.cwd, space=self.inputs.space,
                                     seed=self.inputs.seed, nthreads=self.inputs.nthreads,
                                     sloppy=self.inputs.sloppy)
        self._results.update(out_xfm=files["xfm"], out_info=files["info"],
                             out_warped=files["warped"])


class _ToTemplateInputSpec(_RecordedInputSpec):
    mask_file = File(exists=True, mandatory=True)
    probseg_file = File(exists=True, mandatory=True)
    lesions_file = File(exists=True, mandatory=True)
    registration_info = File(exists=True, mandatory=True)


class _ToTemplateOutputSpec(TraitedSpec):
    out_mask = File(exists=True)
    out_probseg = File(exists=True)
    out_lesions = File(exists=True)


class ResampleToTemplate(_RecordedInterface):
    """Lesion mask (nearest) and probability (linear) in template space, plus template coords."""

    input_spec = _ToTemplateInputSpec
    output_spec = _ToTemplateOutputSpec
    stage = "resampling to the template"

    def _run_step(self, runtime) -> None:
        files = steps.to_template_files(self.inputs.mask_file, self.inputs.probseg_file,
                                        self.inputs.lesions_file, self.inputs.registration_info,
                                        runtime.cwd)
        self._results.update(out_mask=files["mask"], out_probseg=files["probseg"],
                             out_lesions=files["lesions"])


class _DerivativesInputSpec(_RecordedInputSpec):
    output_dir = traits.Str(mandatory=True)
    bids_dir = traits.Str(mandatory=True)
    item = traits.Dict(mandatory=True, desc="the WorkItem of this target")
    brain = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    skullstrip_info = File(exists=True, mandatory=True, desc="SkullStripRecord JSON")
    probseg = File(exists=True, mandatory=True)
    lesion_mask = File(exists=True, mandatory=True)
    lesions = File(exists=True, mandatory=True)
    segment_info = File(exists=True, mandatory=True, desc="SegmentationRecord JSON")
    spaces = traits.List(traits.Str, value=[], usedefault=True)
    template_masks = traits.List(File(exists=True), value=[], usedefault=True)
    template_probsegs = traits.List(File(exists=True), value=[], usedefault=True)
    template_xfms = traits.List(File(exists=True), value=[], usedefault=True)
    template_lesions = traits.List(File(exists=True), value=[], usedefault=True)
    template_t1ws = traits.List(File(exists=True), value=[], usedefault=True)
    template_infos = traits.List(File(exists=True), value=[], usedefault=True,
                                 desc="registration JSONs (for the timings)")


class _DerivativesOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))
    out_summary = File(exists=True)


class WriteDerivatives(_RecordedInterface):
    """Write one target's derivatives through bids_cl.derivatives.writer, then record success (always
    runs: cheap, a rerun after outputs were deleted must restore them, and each run needs its record)."""

    input_spec = _DerivativesInputSpec
    output_spec = _DerivativesOutputSpec
    always_run = True
    stage = "writing derivatives"

    def _run_step(self, runtime) -> None:
        from bids_cl.derivatives.writer import write_target_derivatives
        from bids_cl.utils.bids import WorkItem

        templates = {
            space: {"mask": m, "probseg": p, "xfm": x, "lesions_tsv": t, "t1w": w}
            for space, m, p, x, t, w in zip(self.inputs.spaces, self.inputs.template_masks,
                                            self.inputs.template_probsegs, self.inputs.template_xfms,
                                            self.inputs.template_lesions, self.inputs.template_t1ws,
                                            strict=True)
        }
        skullstrip = SkullStripRecord.read(self.inputs.skullstrip_info)
        segmentation = SegmentationRecord.read(self.inputs.segment_info)
        item = WorkItem.from_dict(self.inputs.item)
        output_dir = Path(self.inputs.output_dir)
        written = write_target_derivatives(
            output_dir, Path(self.inputs.bids_dir), item,
            brain=self.inputs.brain, brain_mask=self.inputs.brain_mask, skullstrip=skullstrip,
            probseg=self.inputs.probseg, lesion_mask=self.inputs.lesion_mask,
            lesions_tsv=self.inputs.lesions, segmentation=segmentation, templates=templates,
        )
        self._results["out_files"] = [os.fspath(p) for p in written]
        self._results["out_summary"] = os.fspath(written[-1])
        self._write_record(TargetRecord(
            prefix=item.prefix, status=STATUS_OK,
            timings=steps.stage_timings(skullstrip, segmentation, list(self.inputs.template_infos)),
            outputs=[p.relative_to(output_dir).as_posix() for p in written]))
