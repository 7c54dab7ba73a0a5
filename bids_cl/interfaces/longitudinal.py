"""Thin Nipype interfaces of the lesion change between two sessions (bids_cl.longitudinal).

``AlignSessions`` (cached: the registration is the costly part) writes an
:class:`~bids_cl.derivatives.records.AlignmentRecord`; ``LesionChange`` (always runs, like
``WriteDerivatives``: cheap, and each run needs its record) classifies the change, writes the
derivatives through the one writer and records the pair's outcome (ok, refused or failed) in
``record_file`` (``targets/<later prefix>_desc-changeFrom<session>.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nipype.interfaces.base import File, TraitedSpec, isdefined, traits

from bids_cl.derivatives.records import (
    STATUS_OK,
    STATUS_REFUSED,
    AlignmentRecord,
    TargetRecord,
)
from bids_cl.interfaces import _RecordedInputSpec, _RecordedInterface


class _AlignInputSpec(_RecordedInputSpec):
    before_brain = File(exists=True, mandatory=True, desc="earlier session, skull-stripped")
    before_mask = File(exists=True, mandatory=True, desc="earlier session's brain mask")
    after_brain = File(exists=True, mandatory=True, desc="later session, skull-stripped")
    after_mask = File(exists=True, mandatory=True, desc="later session's brain mask")
    seed = traits.Int(mandatory=True)
    nthreads = traits.Int(1, usedefault=True)
    sloppy = traits.Bool(False, usedefault=True)


class _AlignOutputSpec(TraitedSpec):
    out_alignment = File(exists=True, desc="AlignmentRecord JSON")


class AlignSessions(_RecordedInterface):
    """Symmetric rigid alignment of two sessions (antspyx, fixed seed) and its quality."""

    input_spec = _AlignInputSpec
    output_spec = _AlignOutputSpec
    stage = "aligning the sessions"

    def _run_step(self, runtime) -> None:
        from bids_cl.longitudinal.pair import align_files
        from bids_cl.utils.io import atomic_write_text

        record = align_files(self.inputs.before_brain, self.inputs.before_mask, self.inputs.after_brain,
                             self.inputs.after_mask, seed=self.inputs.seed, nthreads=self.inputs.nthreads,
                             sloppy=self.inputs.sloppy)
        path = atomic_write_text(Path(runtime.cwd) / "alignment.json", record.to_json())
        self._results["out_alignment"] = os.fspath(path)


class _ChangeInputSpec(_RecordedInputSpec):
    output_dir = traits.Str(mandatory=True)
    earlier_item = traits.Dict(mandatory=True, desc="the WorkItem of the earlier session's target")
    later_item = traits.Dict(mandatory=True, desc="the WorkItem of the later session's target")
    before_lesion_mask = File(exists=True, mandatory=True)
    before_probseg = File(exists=True, mandatory=True)
    before_summary = File(exists=True, mandatory=True, desc="the earlier target's summary derivative")
    after_lesion_mask = File(exists=True, mandatory=True)
    after_probseg = File(exists=True, mandatory=True)
    after_summary = File(exists=True, mandatory=True, desc="the later target's summary derivative")
    alignment = File(exists=True, mandatory=True, desc="AlignmentRecord JSON")
    rules = traits.Dict(value={}, usedefault=True, desc="ChangeRules fields that differ from the defaults")


class _ChangeOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))
    out_summary = File(exists=True)


class LesionChange(_RecordedInterface):
    """Lesion matching and change classes of one pair; derivatives through the one writer."""

    input_spec = _ChangeInputSpec
    output_spec = _ChangeOutputSpec
    always_run = True
    stage = "lesion change"

    def _run_step(self, runtime) -> None:
        from bids_cl.derivatives import spec
        from bids_cl.derivatives.writer import write_change_derivatives
        from bids_cl.longitudinal.change import ChangeRules
        from bids_cl.longitudinal.pair import SessionFiles, compute_change
        from bids_cl.utils.bids import WorkItem

        earlier = WorkItem.from_dict(self.inputs.earlier_item)
        later = WorkItem.from_dict(self.inputs.later_item)

        def session(item: WorkItem, mask: str, probseg: str, summary: str) -> SessionFiles:
            connectivity = int(json.loads(Path(summary).read_text())["Connectivity"])
            table = Path(summary).with_name(spec.output_name(item.prefix, "lesions"))
            return SessionFiles(prefix=item.prefix, lesion_mask=mask, probseg=probseg,
                                lesions_tsv=str(table), connectivity=connectivity)

        before = session(earlier, self.inputs.before_lesion_mask, self.inputs.before_probseg,
                         self.inputs.before_summary)
        after = session(later, self.inputs.after_lesion_mask, self.inputs.after_probseg,
                        self.inputs.after_summary)
        rules = ChangeRules(**dict(self.inputs.rules))
        change = compute_change(before, after, AlignmentRecord.read(self.inputs.alignment), rules)
        sources = [f"bids::{item.anat_dir}/{spec.output_name(item.prefix, 'lesion_mask')}"
                   for item in (earlier, later)]
        output_dir = Path(self.inputs.output_dir)
        written = write_change_derivatives(output_dir, later, str(earlier.session), table=change.table,
                                           dseg=change.dseg, summary=change.summary, sources=sources)
        self._results["out_files"] = [os.fspath(p) for p in written]
        self._results["out_summary"] = os.fspath(written[-1])
        prefix = self.inputs.target_prefix if isdefined(self.inputs.target_prefix) else later.prefix
        self._write_record(TargetRecord(
            prefix=prefix, status=STATUS_REFUSED if change.refused else STATUS_OK,
            stage=self.stage if change.refused else None, reason=change.refused,
            outputs=[p.relative_to(output_dir).as_posix() for p in written]))
