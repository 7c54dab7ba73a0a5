"""The participant-level Nipype graph and its execution.

``init_bids_cl_wf`` -> one ``init_single_subject_wf`` per participant -> one ``init_target_wf`` per
session and target image (sessions are never merged: MS data are longitudinal).
"""

from __future__ import annotations

import getpass
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from bids_cl import __version__
from bids_cl.config import RunConfig
from bids_cl.errors import EXIT_FAILURE, EXIT_OK, BidsClError
from bids_cl.interfaces import (
    RegisterToTemplate,
    ResampleToTemplate,
    Segment,
    SkullStrip,
    WriteDerivatives,
)
from bids_cl.utils.bids import WorkItem
from bids_cl.workflows import outputs

LOGGER = logging.getLogger("bids_cl.workflow")


def _safe_name(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]", "_", text)


def init_bids_cl_wf(config: RunConfig, items: list[WorkItem], *, use_gpu: bool = False,
                    name: str = "bids_cl_wf") -> pe.Workflow:
    """The whole run: one sub-workflow per participant.

    Parameters
    ----------
    config : the run configuration
    items : discovered work (items with a ``problem`` are skipped here and reported by the runner)
    use_gpu : whether segmentation nodes run on CUDA (they are then scheduled as GPU work)
    """
    workflow = pe.Workflow(name=name, base_dir=str(config.work_dir))
    by_participant: dict[str, list[WorkItem]] = {}
    for item in items:
        if item.problem is None:
            by_participant.setdefault(item.participant, []).append(item)
    for participant, subject_items in sorted(by_participant.items()):
        subject_wf = init_single_subject_wf(config, participant, subject_items, use_gpu=use_gpu)
        subject_wf.config["execution"]["crashdump_dir"] = str(
            config.output_dir / f"sub-{participant}" / "log" / config.run_uuid)
        workflow.add_nodes([subject_wf])
    return workflow


def init_single_subject_wf(config: RunConfig, participant: str, items: list[WorkItem], *,
                           use_gpu: bool = False) -> pe.Workflow:
    """All sessions and target images of one participant, each in its own branch."""
    workflow = pe.Workflow(name=f"single_subject_{_safe_name(participant)}_wf")
    workflow.__desc__ = (
        f"Cortical lesions were segmented with bids_cl {__version__} in each session separately "
        "(MS data are longitudinal: sessions are never averaged)."
    )
    for item in items:
        workflow.add_nodes([init_target_wf(config, item, use_gpu=use_gpu,
                                           name=f"target_{_safe_name(item.prefix)}_wf")])
    return workflow


def init_target_wf(config: RunConfig, item: WorkItem, *, use_gpu: bool = False,
                   name: str = "target_wf") -> pe.Workflow:
    """Skull strip -> segment (native space) -> optional template registration -> derivatives.

    Inputs: ``t1w`` (the target image), ``inv2`` (MP2RAGE second inversion, optional).
    Outputs: ``summary`` (the per-image summary JSON in the derivatives).
    """
    workflow = pe.Workflow(name=name)
    nthreads = config.omp_nthreads or 1
    inputnode = pe.Node(IdentityInterface(fields=["t1w", "inv2"]), name="inputnode")
    inputnode.inputs.t1w = item.target
    if item.inv2:
        inputnode.inputs.inv2 = item.inv2
    outputnode = pe.Node(IdentityInterface(fields=["summary"]), name="outputnode")

    skullstrip = pe.Node(
        SkullStrip(strategy=config.skull_strip, is_mp2rage=item.sequence == "MP2RAGE",
                   nthreads=nthreads),
        name="skullstrip", n_procs=nthreads, mem_gb=6)  # SynthStrip: 4.9 GiB peak RSS at 1 mm
    if config.synthstrip_model:
        skullstrip.inputs.synthstrip_model = str(config.synthstrip_model)

    segment = pe.Node(
        Segment(model=config.model, device=config.device, folds=config.folds,
                tta=False if config.disable_tta else None, threshold=config.threshold,
                min_lesion_size=config.min_lesion_size, connectivity=config.connectivity,
                nthreads=nthreads, use_gpu=use_gpu),
        name="segment", n_procs=nthreads, mem_gb=4)

    datasink = pe.Node(
        WriteDerivatives(output_dir=str(config.output_dir), bids_dir=str(config.bids_dir),
                         item=item.to_dict()),
        name="write_derivatives", run_without_submitting=True)

    workflow.connect([
        (inputnode, skullstrip, [("t1w", "in_file")]),
        (skullstrip, segment, [("out_brain", "in_file"), ("out_mask", "mask_file")]),
        (skullstrip, datasink, [("out_brain", "brain"), ("out_mask", "brain_mask"),
                                ("out_info", "skullstrip_info")]),
        (segment, datasink, [("out_probseg", "probseg"), ("out_mask", "lesion_mask"),
                             ("out_lesions", "lesions"), ("out_info", "segment_info")]),
        (datasink, outputnode, [("out_summary", "summary")]),
    ])
    if item.inv2:
        workflow.connect([(inputnode, skullstrip, [("inv2", "inv2_file")])])

    if config.output_spaces:
        template_wf = init_template_wf(config, name="template_wf")
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
                                     ("outputnode.t1ws", "template_t1ws")]),
        ])
    return workflow


def init_template_wf(config: RunConfig, *, name: str = "template_wf") -> pe.Workflow:
    """Register the stripped image to each output space and resample the lesion maps there.

    Inputs: ``brain``, ``lesion_mask``, ``probseg``, ``lesions``.
    Outputs: lists, one entry per space in ``config.output_spaces`` order.
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = ("Lesion maps were resampled to standard space after antspyx affine + SyN "
                         "registration of the skull-stripped image (fixed random seed).")
    nthreads = config.omp_nthreads or 1
    inputnode = pe.Node(IdentityInterface(fields=["brain", "lesion_mask", "probseg", "lesions"]),
                        name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["masks", "probsegs", "xfms", "lesions", "t1ws"]),
                         name="outputnode")
    register = pe.MapNode(
        RegisterToTemplate(seed=config.random_seed, nthreads=nthreads, sloppy=config.sloppy),
        iterfield=["space"], name="register", n_procs=nthreads, mem_gb=3)
    register.inputs.space = list(config.output_spaces)
    resample = pe.MapNode(ResampleToTemplate(), iterfield=["registration_info"],
                          name="resample", mem_gb=2)
    workflow.connect([
        (inputnode, register, [("brain", "in_file")]),
        (inputnode, resample, [("lesion_mask", "mask_file"), ("probseg", "probseg_file"),
                               ("lesions", "lesions_file")]),
        (register, resample, [("out_info", "registration_info")]),
        (register, outputnode, [("out_xfm", "xfms"), ("out_warped", "t1ws")]),
        (resample, outputnode, [("out_mask", "masks"), ("out_probseg", "probsegs"),
                                ("out_lesions", "lesions")]),
    ])
    return workflow


# --------------------------------------------------------------------------------------------
# Execution


def _preflight(config: RunConfig) -> dict[str, Any]:
    """Fail fast, before any work: model present and trusted, templates present, device usable."""
    from bids_cl.engine import load_model
    from bids_cl.engine.segmentation import resolve_device

    model = load_model(config.model)
    if config.output_spaces:
        from bids_cl.preproc import check_templates

        check_templates(config.output_spaces)
    device = resolve_device(config.device).type
    if device == "cpu" and config.device == "auto":
        LOGGER.warning("No CUDA device found: segmenting on the CPU (slower; test-time "
                       "augmentation off unless asked).")
    return {"model": model, "device": device}


# Plugins that run nodes on this machine; every other one submits jobs to a cluster scheduler.
_IN_PROCESS_PLUGINS = ("MultiProc", "LegacyMultiProc", "Linear", "Debug")


def _plugin_settings(config: RunConfig, use_gpu: bool) -> tuple[str, dict[str, Any]]:
    plugin = config.plugin or "MultiProc"
    args = dict(config.plugin_args)
    if plugin in ("MultiProc", "LegacyMultiProc"):
        args.setdefault("n_procs", config.nprocs or 1)
        if config.mem_mb:
            args.setdefault("memory_gb", config.mem_mb / 1024)
        args.setdefault("raise_insufficient", False)
        args.setdefault("maxtasksperchild", 1)
        # Workers must be forked: a forked worker inherits bids_cl's logging (Nipype's stdout handler
        # removed, cli/run.py), a spawned or forkserver one re-imports Nipype and prints its INFO lines
        # on the console. Python 3.14 makes forkserver the Linux default, so name fork explicitly.
        if "fork" in multiprocessing.get_all_start_methods():
            args.setdefault("mp_context", "fork")
        if use_gpu:
            args.setdefault("n_gpu_procs", 1)
    return plugin, args


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (a container run with --user)
        return f"uid{os.getuid()}"


def _crash_reason(crash_files: list[Path]) -> tuple[str, int]:
    """One line and an exit code from the crash files of a failed target."""
    for crash in crash_files:
        try:
            text = crash.read_text(errors="replace")
        except OSError:
            continue
        match = re.search(r"\[exit (\d+)\] ([^\n]+)", text)
        if match:
            return match.group(2).strip(), int(match.group(1))
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln)]
        if errors:
            return errors[-1][:300], EXIT_FAILURE
    return "the workflow failed (see the crash files)", EXIT_FAILURE


def run_participants(config: RunConfig, items: list[WorkItem], *, log_file: Path) -> int:
    """Build and run the workflow; write logs, reports and an exit code per the BIDS-Apps spec.

    One failing target never stops the others; the process exits non-zero when any failed.
    """
    env = _preflight(config)
    use_gpu = env["device"] == "cuda"
    config.device = env["device"]
    model_provenance = getattr(env["model"], "provenance", {})
    try:
        config.work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BidsClError(f"cannot create the work directory {config.work_dir}: {exc.strerror}",
                          73) from None

    outputs.write_dataset_description(config.output_dir, config.bids_dir, model_provenance)
    participants = sorted({i.participant for i in items})
    log_dirs = {
        p: outputs.write_participant_log(config.output_dir, p, config.run_uuid,
                                         config_toml=config.to_toml(),
                                         items=[i for i in items if i.participant == p])
        for p in participants
    }

    workflow = init_bids_cl_wf(config, items, use_gpu=use_gpu)
    workflow.config["execution"].update({
        "crashfile_format": "txt",
        "stop_on_first_crash": False,
        "remove_unnecessary_outputs": False,
        "hash_method": "content",
    })
    workflow.config["monitoring"] = {"enabled": False}
    plugin, plugin_args = _plugin_settings(config, use_gpu)
    # How often Nipype checks on running nodes. Locally that is cheap; on a cluster each check is a
    # squeue/qstat call per job, which schedulers ask users to keep rare.
    workflow.config["execution"]["poll_sleep_duration"] = float(plugin_args.pop(
        "poll_sleep_duration", 0.2 if plugin in _IN_PROCESS_PLUGINS else 10.0))
    if plugin not in _IN_PROCESS_PLUGINS:
        # Nipype's cluster plugins (SLURM, SGE, PBS, LSF, OAR) name each job after os.environ["LOGNAME"]
        # and raise KeyError where it is unset (containers, cron, some batch shells).
        os.environ.setdefault("LOGNAME", _user_name())
    LOGGER.info("Running %d target(s) of %d participant(s) with %s %s",
                sum(i.problem is None for i in items), len(participants), plugin, plugin_args)
    start = time.perf_counter()
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as exc:  # Nipype raises when any node failed; we sort it out per target
        LOGGER.debug("workflow finished with errors: %s", exc)
    elapsed = time.perf_counter() - start

    failures: list[tuple[WorkItem, str, int]] = []
    for item in items:
        log_dir = log_dirs[item.participant]
        if item.problem is not None:
            outputs.write_crash_note(log_dir, item.prefix, item.problem, item.problem_code or 1,
                                     [])
            failures.append((item, item.problem, item.problem_code or EXIT_FAILURE))
            continue
        summary = outputs.derivative_path(config.output_dir, item,
                                          "label-CL_desc-summary_stats.json")
        if summary.is_file():
            continue
        crash_files = sorted(log_dir.glob("crash-*.txt"))
        crash_files = [c for c in crash_files if not c.name.startswith(f"crash-{item.prefix}")]
        relevant = [c for c in crash_files if _safe_name(item.prefix) in c.read_text(errors="replace")
                    ] or crash_files
        reason, code = _crash_reason(relevant)
        outputs.write_crash_note(log_dir, item.prefix, reason, code, [str(c) for c in relevant])
        failures.append((item, reason, code))

    _write_timings(config, items, log_dirs)
    for log_dir in log_dirs.values():
        shutil.copyfile(log_file, log_dir / "bids_cl.log")
    _write_reports(config, participants)

    failed = {f[0].prefix for f in failures}
    for item in (i for i in items if i.problem is None and i.prefix not in failed):
        summary = json.loads(outputs.derivative_path(
            config.output_dir, item, "label-CL_desc-summary_stats.json").read_text())
        print(f"{item.prefix}: {summary['LesionCount']} cortical lesion(s), "
              f"{summary['TotalVolume_uL']:.1f} uL", file=sys.stdout)
    LOGGER.info("Finished in %.1f s", elapsed)
    if not failures:
        return EXIT_OK
    for item, reason, code in failures:
        crash_dir = log_dirs[item.participant]
        print(f"bids_cl: error: {item.prefix} failed (exit {code}): {reason} "
              f"[log: {crash_dir}]", file=sys.stderr)
    codes = {code for _, _, code in failures}
    return codes.pop() if len(codes) == 1 else EXIT_FAILURE


def _write_timings(config: RunConfig, items: list[WorkItem], log_dirs: dict[str, Path]) -> None:
    """Stage timings from the node outputs (cached nodes keep the time of the run that made them)."""
    per_participant: dict[str, dict[str, dict[str, float]]] = {}
    base = config.work_dir / "bids_cl_wf"
    for item in items:
        if item.problem is not None:
            continue
        target_dir = (base / f"single_subject_{_safe_name(item.participant)}_wf"
                      / f"target_{_safe_name(item.prefix)}_wf")
        stages: dict[str, float] = {}
        for stage, filename in (("skullstrip", "skullstrip/skullstrip.json"),
                                ("segment", "segment/segment.json")):
            path = target_dir / filename
            if path.is_file():
                info = json.loads(path.read_text())
                stages[stage] = info.get("seconds", 0.0)
                for step, seconds in (info.get("summary", {}).get("Timings") or {}).items():
                    if isinstance(seconds, (int, float)):
                        stages[f"{stage}.{step}"] = seconds
        for reg in sorted(target_dir.glob("template_wf/register/mapflow/_register*/"
                                          "registration.json")):
            info = json.loads(reg.read_text())
            stages[f"register_{info.get('space')}"] = info.get("seconds", 0.0)
        per_participant.setdefault(item.participant, {})[item.prefix] = stages
    for participant, timings in per_participant.items():
        outputs.write_timings(log_dirs[participant], timings)


def _write_reports(config: RunConfig, participants: list[str]) -> None:
    try:
        from bids_cl.reports import generate_participant_report
    except ImportError:
        return
    for participant in participants:
        try:
            generate_participant_report(config.output_dir, participant)
        except Exception as exc:  # a report problem must not fail a finished segmentation
            LOGGER.warning("report for sub-%s failed: %s", participant, exc)
