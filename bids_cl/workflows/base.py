"""The participant-level Nipype graph (building only: :mod:`bids_cl.cli.workflow` runs it).

``init_bids_cl_wf`` -> one ``init_single_subject_wf`` per participant -> one ``init_target_wf`` per
session and target image (sessions are never merged: MS data are longitudinal) -> ``init_template_wf``
per target when template spaces are asked for.

Every workflow carries ``__desc__``, a methods paragraph; :func:`collect_methods` gathers them in graph
order for the ``CITATION.md`` of the output folder.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from bids_cl import __version__
from bids_cl.config import ResolvedRun, RunConfig
from bids_cl.derivatives import spec
from bids_cl.engine.worker import WORKER_DEPTH
from bids_cl.interfaces import (
    RegisterToTemplate,
    ResampleToTemplate,
    Segment,
    SkullStrip,
    WriteDerivatives,
)
from bids_cl.utils.bids import WorkItem
from bids_cl.utils.resources import segment_threads

# Declared memory of each node, in GB: what the scheduler reserves (MultiProc's memory_gb budget, a
# cluster plugin's --mem). Measured peaks are in docs/engine.md and docs/preprocessing.md.
SKULLSTRIP_MEM_GB = 6  # SynthStrip, one 1 mm image: 4.9 GiB peak RSS (docs/preprocessing.md)
SEGMENT_MEM_GB = 12  # paper plans, 5 folds, 7T 0.75 mm, CPU, 4 tile workers: 9.6 GiB peak RSS, +25 %
REGISTER_MEM_GB = 4  # antspyx SyN, 7T at 0.5 mm: 3.21 GiB peak RSS (node + child), +25 %
RESAMPLE_MEM_GB = 3  # 0.5 mm lesion maps to the 1 mm template: 2.21 GiB peak RSS, +25 %


def safe_name(text: str) -> str:
    """A Nipype node/workflow name for any label (letters and digits; the rest becomes _)."""
    return re.sub(r"[^0-9a-zA-Z]", "_", text)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown version"


def record_file(config: RunConfig, item: WorkItem) -> Path:
    """Where the target's :class:`~bids_cl.derivatives.records.TargetRecord` goes in this run's log."""
    return spec.record_path(spec.log_dir(config.output_dir, item.participant, config.run_uuid),
                            item.prefix)


def nipype_crash_dir(config: RunConfig, participant: str) -> Path:
    """Nipype's own crash files (tracebacks) of this run, apart from bids_cl's one-line notes."""
    return spec.log_dir(config.output_dir, participant, config.run_uuid) / spec.NIPYPE_CRASH_DIR


def init_bids_cl_wf(*, config: RunConfig, resolved: ResolvedRun, items: list[WorkItem],
                    name: str = "bids_cl_wf") -> pe.Workflow:
    """The whole run: one sub-workflow per participant.

    Parameters
    ----------
    config : what the user asked for
    resolved : what this run resolved it to (device, threads, the verified model folder)
    items : the usable targets of the run (discovery's problems are the runner's business)
    """
    workflow = pe.Workflow(name=name, base_dir=str(config.work_dir))
    workflow.__desc__ = (
        f"Cortical lesions were segmented with bids_cl {__version__}, an implementation of the "
        "nnU-Net v2 cortical lesion model of Molchanova et al. (NeuroImage: Clinical 2026), "
        f"run with Nipype {_package_version('nipype')}."
    )
    by_participant: dict[str, list[WorkItem]] = {}
    for item in items:
        by_participant.setdefault(item.participant, []).append(item)
    for participant, subject_items in sorted(by_participant.items()):
        workflow.add_nodes([init_single_subject_wf(config=config, resolved=resolved,
                                                   participant=participant, items=subject_items)])
    return workflow


def init_single_subject_wf(*, config: RunConfig, resolved: ResolvedRun, participant: str,
                           items: list[WorkItem], name: str | None = None) -> pe.Workflow:
    """All sessions and target images of one participant, each in its own branch."""
    workflow = pe.Workflow(name=name or f"single_subject_{safe_name(participant)}_wf")
    workflow.__desc__ = ("Each session and each T1-weighted image was processed separately (MS data "
                         "are longitudinal: sessions are never averaged).")
    crash_dir = nipype_crash_dir(config, participant)

    def set_crash_dir(sub_wf: pe.Workflow) -> None:
        # Node settings win over the workflow's at run time (Nipype merges them per node), so the
        # crash folder must be set on every node, not on this sub-workflow.
        for node_name in sub_wf.list_node_names():
            node = sub_wf.get_node(node_name)
            node.config = {"execution": {"crashdump_dir": str(crash_dir)}}

    target_wfs: dict[str, pe.Workflow] = {}
    for item in items:
        target_wf = init_target_wf(config=config, resolved=resolved, item=item,
                                   name=f"target_{safe_name(item.prefix)}_wf")
        set_crash_dir(target_wf)
        workflow.add_nodes([target_wf])
        target_wfs[item.prefix] = target_wf
    if config.longitudinal == "auto":
        # Lesion change between sessions of one target line (unpairable sessions: the runner warns).
        from bids_cl.longitudinal.pairs import plan_pairs
        from bids_cl.workflows.longitudinal import SESSION_FIELDS, init_longitudinal_wf

        for pair in plan_pairs(items)[0]:
            pair_wf = init_longitudinal_wf(config=config, resolved=resolved, pair=pair,
                                           name=f"change_{safe_name(pair.name)}_wf")
            set_crash_dir(pair_wf)
            for side, item in (("before", pair.earlier), ("after", pair.later)):
                for f in SESSION_FIELDS:
                    workflow.connect(target_wfs[item.prefix], f"outputnode.{f}",
                                     pair_wf, f"inputnode.{side}_{f}")
    return workflow


def _strip_description(strategy: str) -> str:
    if strategy == "auto":
        return ("skull-stripped in native space with SynthStrip (Hoopes et al., 2022), as the model was "
                "trained, when its weights were available, else (MP2RAGE) with a mask computed on the "
                "second inversion, else with deepbet; each image's summary names the method used")
    return {
        "synthstrip": "skull-stripped in native space with SynthStrip (Hoopes et al., 2022)",
        "deepbet": "skull-stripped in native space with deepbet",
        "inv2": "skull-stripped in native space with a mask computed on the MP2RAGE second inversion",
        "ants": "skull-stripped in native space with an antspyx template-based mask",
        "none": "used as given (already skull-stripped)",
    }[strategy]


def init_target_wf(*, config: RunConfig, resolved: ResolvedRun, item: WorkItem,
                   name: str = "target_wf") -> pe.Workflow:
    """Skull strip -> segment (native space) -> optional template registration -> derivatives.

    Inputs: ``t1w`` (the target image), ``inv2`` (MP2RAGE second inversion, optional).
    Outputs: ``summary`` (the per-image summary JSON in the derivatives); ``brain``, ``brain_mask``,
    ``lesion_mask``, ``probseg`` (the stage outputs the lesion change between sessions reads).
    """
    workflow = pe.Workflow(name=name)
    tta = "off" if config.disable_tta else ("on" if resolved.device == "cuda" else "off (CPU default)")
    workflow.__desc__ = (
        f"Each T1-weighted image (MP2RAGE UNI or MPRAGE) was {_strip_description(config.skull_strip)}. "
        f"Cortical lesions were segmented with nnU-Net v2 ({_package_version('nnunetv2')}; Isensee et al., "
        f"2021) in native space with the model '{config.model}', ensembling "
        f"{'all folds' if config.folds is None else 'folds ' + ', '.join(map(str, config.folds))} "
        f"(test-time mirroring {tta}); lesions are the {config.connectivity}-connected components of the "
        "ensemble probability above the threshold recorded in each image's summary."
    )
    nthreads = resolved.omp_nthreads
    gpu = resolved.device == "cuda"
    # On a GPU the segment node holds few CPU slots, so MultiProc keeps skull-stripping and
    # registering other participants while the GPU works (utils.resources.segment_threads).
    engine_threads = segment_threads(nthreads, gpu=gpu)
    segment_cpus = engine_threads
    segment_mem_gb = SEGMENT_MEM_GB
    shared = resolved.worker_address is not None  # the runner started the run's shared worker
    if shared and gpu:
        # The node waits on the run's shared worker in one of its WORKER_DEPTH GPU slots; what it holds
        # meanwhile is its share of the worker's CPUs and memory (bids_cl.engine.worker).
        segment_cpus = max(1, segment_cpus // WORKER_DEPTH)
        segment_mem_gb = SEGMENT_MEM_GB / WORKER_DEPTH
    record = str(record_file(config, item))
    recorded = {"record_file": record, "target_prefix": item.prefix}
    inputnode = pe.Node(IdentityInterface(fields=["t1w", "inv2"]), name="inputnode")
    inputnode.inputs.t1w = item.target
    if item.inv2:
        inputnode.inputs.inv2 = item.inv2
    outputnode = pe.Node(IdentityInterface(fields=["summary", "brain", "brain_mask", "lesion_mask",
                                                   "probseg"]), name="outputnode")

    skullstrip = pe.Node(
        SkullStrip(strategy=config.skull_strip, is_mp2rage=item.sequence == "MP2RAGE",
                   nthreads=nthreads, **recorded),
        name="skullstrip", n_procs=nthreads, mem_gb=SKULLSTRIP_MEM_GB)
    if config.synthstrip_model:
        skullstrip.inputs.synthstrip_model = str(config.synthstrip_model)

    segment = pe.Node(
        # The runner verified the model's lock once for the run: the nodes do not hash it again.
        Segment(model=resolved.model, model_verified=True, device=resolved.device,
                folds=config.folds, tta=False if config.disable_tta else None, threshold=config.threshold,
                min_lesion_size=config.min_lesion_size, connectivity=config.connectivity,
                nthreads=engine_threads,
                # A node waiting on the shared worker takes a GPU slot on a CPU run too: one image at once.
                use_gpu=gpu or shared, **recorded),
        name="segment", n_procs=segment_cpus, mem_gb=segment_mem_gb)
    if shared:
        segment.inputs.worker = resolved.worker_address

    datasink = pe.Node(
        WriteDerivatives(output_dir=str(config.output_dir), bids_dir=str(config.bids_dir),
                         item=item.to_dict(), **recorded),
        name="write_derivatives", run_without_submitting=True)

    workflow.connect([
        (inputnode, skullstrip, [("t1w", "in_file")]),
        (skullstrip, segment, [("out_brain", "in_file"), ("out_mask", "mask_file")]),
        (skullstrip, datasink, [("out_brain", "brain"), ("out_mask", "brain_mask"),
                                ("out_info", "skullstrip_info")]),
        (segment, datasink, [("out_probseg", "probseg"), ("out_mask", "lesion_mask"),
                             ("out_lesions", "lesions"), ("out_info", "segment_info")]),
        (datasink, outputnode, [("out_summary", "summary")]),
        # for the lesion change between sessions (workflows/longitudinal.py)
        (skullstrip, outputnode, [("out_brain", "brain"), ("out_mask", "brain_mask")]),
        (segment, outputnode, [("out_mask", "lesion_mask"), ("out_probseg", "probseg")]),
    ])
    if item.inv2:
        workflow.connect([(inputnode, skullstrip, [("inv2", "inv2_file")])])

    if config.output_spaces:
        template_wf = init_template_wf(config=config, omp_nthreads=nthreads, record=recorded,
                                       name="template_wf")
        datasink.inputs.spaces = list(config.output_spaces)
        workflow.connect([
            (skullstrip, template_wf, [("out_brain", "inputnode.brain")]),
            (segment, template_wf, [("out_mask", "inputnode.lesion_mask"),
                                    ("out_probseg", "inputnode.probseg"),
                                    ("out_lesions", "inputnode.lesions")]),
            (template_wf, datasink, [("outputnode.masks", "template_masks"),
                                     ("outputnode.probsegs", "template_probsegs"),
                                     ("outputnode.xfms", "template_xfms"),
                                     ("outputnode.lesions", "template_lesions"),
                                     ("outputnode.t1ws", "template_t1ws"),
                                     ("outputnode.infos", "template_infos")]),
        ])
    return workflow


def init_template_wf(*, config: RunConfig, omp_nthreads: int, record: dict[str, str] | None = None,
                     name: str = "template_wf") -> pe.Workflow:
    """Register the stripped image to each output space and resample the lesion maps there.

    Inputs: ``brain``, ``lesion_mask``, ``probseg``, ``lesions``.
    Outputs: lists, one entry per space in ``config.output_spaces`` order.
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        f"Lesion maps were resampled to {', '.join(config.output_spaces)} after antspyx "
        f"({_package_version('antspyx')}; Avants et al., 2011) affine and SyN registration of the "
        f"skull-stripped image (random seed {config.random_seed}; "
        + ("coarse 'sloppy' schedule for testing" if config.sloppy else
           "estimated on a 2 mm working grid cropped to the head, 40x20 SyN iterations, applied at full "
           "resolution") + ")."
    )
    recorded = dict(record or {})
    inputnode = pe.Node(IdentityInterface(fields=["brain", "lesion_mask", "probseg", "lesions"]),
                        name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["masks", "probsegs", "xfms", "lesions", "t1ws",
                                                   "infos"]), name="outputnode")
    register = pe.MapNode(
        RegisterToTemplate(seed=config.random_seed, nthreads=omp_nthreads, sloppy=config.sloppy,
                           **recorded),
        iterfield=["space"], name="register", n_procs=omp_nthreads, mem_gb=REGISTER_MEM_GB)
    register.inputs.space = list(config.output_spaces)
    resample = pe.MapNode(ResampleToTemplate(**recorded), iterfield=["registration_info"],
                          name="resample", mem_gb=RESAMPLE_MEM_GB)
    workflow.connect([
        (inputnode, register, [("brain", "in_file")]),
        (inputnode, resample, [("lesion_mask", "mask_file"), ("probseg", "probseg_file"),
                               ("lesions", "lesions_file")]),
        (register, resample, [("out_info", "registration_info")]),
        (register, outputnode, [("out_xfm", "xfms"), ("out_warped", "t1ws"), ("out_info", "infos")]),
        (resample, outputnode, [("out_mask", "masks"), ("out_probseg", "probsegs"),
                                ("out_lesions", "lesions")]),
    ])
    return workflow


def collect_methods(workflow: pe.Workflow) -> list[str]:
    """The ``__desc__`` paragraphs of ``workflow`` and its sub-workflows, outermost first, each once."""
    import networkx as nx

    found: list[str] = []

    def visit(wf: pe.Workflow) -> None:
        desc = getattr(wf, "__desc__", None)  # plain Nipype workflows need not carry one
        if desc and desc not in found:
            found.append(desc)
        for node in nx.topological_sort(wf._graph):  # noqa: SLF001 - Nipype has no public iterator
            if isinstance(node, pe.Workflow):
                visit(node)

    visit(workflow)
    return found
