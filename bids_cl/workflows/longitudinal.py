"""The lesion change of one pair of sessions (graph building only; docs/longitudinal.md).

``init_longitudinal_wf`` takes the outputs of two target workflows of one participant and target line
(earlier, later): symmetric rigid alignment -> lesion matching and change classes -> derivatives in the
later session's folder. The per-session workflows are unchanged by it.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from bids_cl.config import ResolvedRun, RunConfig
from bids_cl.derivatives import spec
from bids_cl.interfaces.longitudinal import AlignSessions, LesionChange
from bids_cl.longitudinal.change import ChangeRules
from bids_cl.longitudinal.pairs import SessionPair

# Full-size 1 mm phantom pair, alignment and change in one process: 0.63 GiB peak RSS (the antspyx child
# works at 2 mm); declared with a wide margin.
ALIGN_MEM_GB = 2
CHANGE_MEM_GB = 2
SESSION_FIELDS = ("brain", "brain_mask", "lesion_mask", "probseg", "summary")


def pair_record_file(config: RunConfig, pair: SessionPair) -> Path:
    """Where the pair's :class:`~bids_cl.derivatives.records.TargetRecord` goes in this run's log."""
    return spec.record_path(spec.log_dir(config.output_dir, pair.later.participant, config.run_uuid),
                            pair.name)


def longitudinal_description(config: RunConfig) -> str:
    rules = ChangeRules(**dict(config.change_rules))
    return (
        "Lesion change between sessions of one participant and target line (consecutive sessions and "
        "baseline to last) was classified after a symmetric rigid alignment of the skull-stripped images "
        "(antspyx, both directions averaged, random seed "
        f"{config.random_seed}; both sessions resampled to their halfway space). A later lesion within "
        f"{rules.tolerance_mm:g} mm of no earlier lesion was new unless the earlier lesion probability "
        f"reached {rules.rescue_probability:g} inside it; lesions were enlarging (shrinking) when their "
        f"volume grew by at least {100 * rules.enlarge_relative:.0f}% (fell by at least "
        f"{100 * rules.shrink_relative:.0f}%) and by at least {rules.min_change_ul:g} uL; change was not "
        f"classified when the correlation of the aligned images inside the brain was below "
        f"{rules.min_alignment:g}."
    )


def init_longitudinal_wf(*, config: RunConfig, resolved: ResolvedRun, pair: SessionPair,
                         name: str = "longitudinal_wf") -> pe.Workflow:
    """Align the two sessions of ``pair``, classify the lesion change, write it.

    Inputs: ``before_<f>`` and ``after_<f>`` for ``f`` in :data:`SESSION_FIELDS` (the target workflows'
    outputnode fields). Outputs: ``summary`` (the change summary JSON in the derivatives).
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = longitudinal_description(config)
    recorded = {"record_file": str(pair_record_file(config, pair)), "target_prefix": pair.name}
    fields = [f"{side}_{f}" for side in ("before", "after") for f in SESSION_FIELDS]
    inputnode = pe.Node(IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["summary"]), name="outputnode")
    nthreads = resolved.omp_nthreads
    align = pe.Node(AlignSessions(seed=config.random_seed, nthreads=nthreads, sloppy=config.sloppy,
                                  **recorded), name="align", n_procs=nthreads, mem_gb=ALIGN_MEM_GB)
    change = pe.Node(LesionChange(output_dir=str(config.output_dir), earlier_item=pair.earlier.to_dict(),
                                  later_item=pair.later.to_dict(), rules=dict(config.change_rules),
                                  **recorded),
                     name="lesion_change", mem_gb=CHANGE_MEM_GB)
    workflow.connect([
        (inputnode, align, [("before_brain", "before_brain"), ("before_brain_mask", "before_mask"),
                            ("after_brain", "after_brain"), ("after_brain_mask", "after_mask")]),
        (inputnode, change, [("before_lesion_mask", "before_lesion_mask"),
                             ("before_probseg", "before_probseg"), ("before_summary", "before_summary"),
                             ("after_lesion_mask", "after_lesion_mask"),
                             ("after_probseg", "after_probseg"), ("after_summary", "after_summary")]),
        (align, change, [("out_alignment", "alignment")]),
        (change, outputnode, [("out_summary", "summary")]),
    ])
    return workflow
