"""Running the participant level: preflight, the Nipype run, and what the user sees afterwards.

The graph is built by :mod:`bids_cl.workflows.base`; this module resolves the request on this machine
(:class:`~bids_cl.config.ResolvedRun`: device, threads, memory, the model verified once for the whole
run), runs the graph with the chosen plugin, reads each target's
:class:`~bids_cl.derivatives.records.TargetRecord`, and writes logs, timings, reports and the methods text.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_cl.config import ResolvedRun, RunConfig, is_local_plugin
from bids_cl.derivatives import spec, writer
from bids_cl.derivatives.records import STATUS_FAILED, TargetRecord
from bids_cl.errors import (
    EXIT_CANNOT_CREATE_OUTPUT,
    EXIT_FAILURE,
    EXIT_OK,
    BidsClError,
    output_error,
)
from bids_cl.utils.bids import WorkItem

if TYPE_CHECKING:
    from bids_cl.engine.worker import WorkerHandle

LOGGER = logging.getLogger("bids_cl.workflow")


def resolve_run(config: RunConfig) -> tuple[ResolvedRun, dict[str, Any]]:
    """Fail fast, before any work: model present and trusted, templates present, device usable.

    Returns what the request resolves to here, and the model's provenance. The model's lock is
    verified here, once for the run; the segmentation nodes load the verified folder.
    """
    from bids_cl.engine import load_model
    from bids_cl.engine.registry import PUBLISHED_MODEL
    from bids_cl.engine.segmentation import resolve_device
    from bids_cl.utils.resources import effective_cpus, effective_mem_mb

    model = load_model(config.model)
    if config.folds is not None:
        model.select_folds(config.folds)  # a fold the model lacks is a usage error, before any work
    if config.output_spaces:
        from bids_cl.preproc import check_templates

        check_templates(config.output_spaces)
    device = resolve_device(config.device).type
    nprocs, omp_nthreads = effective_cpus(config.nprocs, config.omp_nthreads, gpu=device == "cuda")
    resolved = ResolvedRun(device=device, nprocs=nprocs, omp_nthreads=omp_nthreads,
                           mem_mb=effective_mem_mb(config.mem_mb),
                           model=PUBLISHED_MODEL if config.model == "auto" else config.model,
                           random_seed=config.random_seed,
                           segment_worker=segment_worker_mode(config, device))
    return resolved, model.provenance


def segment_worker_mode(config: RunConfig, device: str) -> str:
    """``"shared"`` or ``"node"``: what ``--segment-worker`` means for this run (bids_cl.engine.worker).

    auto shares one worker on a GPU whose nodes run on this machine: the GPU segments one image at a
    time either way, and the shared worker loads the model once and reads the next image meanwhile. On
    a CPU several segment nodes may run at once, each with its own threads, so each loads its own.
    """
    if config.segment_worker != "auto":
        return config.segment_worker
    return "shared" if device == "cuda" and is_local_plugin(config.plugin) else "node"


def plugin_settings(config: RunConfig, resolved: ResolvedRun) -> tuple[str, dict[str, Any]]:
    """The Nipype plugin and its arguments: the user's, completed with this run's resources."""
    from bids_cl.engine.worker import WORKER_DEPTH

    plugin = config.plugin or "MultiProc"
    args = dict(config.plugin_args)
    if plugin in ("MultiProc", "LegacyMultiProc"):
        args.setdefault("n_procs", resolved.nprocs)
        if resolved.mem_mb:
            args.setdefault("memory_gb", resolved.mem_mb / 1024)
        args.setdefault("raise_insufficient", False)
        args.setdefault("maxtasksperchild", 1)
        # Workers must be forked: a forked worker inherits bids_cl's logging (Nipype's stdout handler
        # removed, cli/run.py), a spawned or forkserver one re-imports Nipype and prints its INFO lines
        # on the console. Python 3.14 makes forkserver the Linux default, so name fork explicitly.
        if "fork" in multiprocessing.get_all_start_methods():
            args.setdefault("mp_context", "fork")
        if resolved.worker_address is not None:
            # Each segment node waits on the shared worker in a GPU slot: as many images at once as the
            # worker's stages hold on a GPU (one preparing, one on the device, one measured), one on a CPU.
            args.setdefault("n_gpu_procs", WORKER_DEPTH if resolved.device == "cuda" else 1)
        elif resolved.device == "cuda":
            args.setdefault("n_gpu_procs", 1)
    return plugin, args


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (a container run with --user)
        return f"uid{os.getuid()}"


def _unrecorded_failure(item: WorkItem, crash_dir: Path) -> tuple[str, int, list[str]]:
    """Reason and code of a target that left no record (a node killed, or a record it could not write).

    Nipype's crash files for the target are the only evidence left: the last exception line is the
    reason; a full disk is exit 73 as everywhere else.
    """
    import re

    from bids_cl.workflows.base import safe_name

    files = sorted(crash_dir.glob("crash-*")) if crash_dir.is_dir() else []
    mine = [f for f in files if safe_name(item.prefix) in f.name] or files
    for crash in mine:
        lines = [ln.strip() for ln in crash.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln)]
        if errors:
            last = errors[-1]
            code = EXIT_CANNOT_CREATE_OUTPUT if "No space left" in last or "Disk quota" in last \
                else EXIT_FAILURE
            return last[:300], code, [str(f) for f in mine]
    return ("the workflow stopped before this target finished (no record; see the Nipype crash "
            "files)", EXIT_FAILURE, [str(f) for f in mine])


def _outcome(config: RunConfig, item: WorkItem) -> TargetRecord:
    """The target's record of this run (read, never inferred from which files exist)."""
    from bids_cl.workflows.base import nipype_crash_dir, record_file

    path = record_file(config, item)
    if path.is_file():
        try:
            return TargetRecord.read(path)
        except (OSError, ValueError) as exc:
            LOGGER.warning("unreadable record %s: %s", path, exc)
    reason, code, files = _unrecorded_failure(item, nipype_crash_dir(config, item.participant))
    return TargetRecord(prefix=item.prefix, status=STATUS_FAILED, exit_code=code, reason=reason,
                        outputs=files)


def run_participants(config: RunConfig, items: list[WorkItem], problems: list[WorkItem], *,
                     log_file: Path) -> int:
    """Build and run the workflow; write logs, reports and an exit code per the BIDS-Apps spec.

    ``items`` are the usable targets, ``problems`` the targets discovery found unusable (each reported,
    none run). One failing target never stops the others; the process exits non-zero when any failed.
    """
    resolved, model_provenance = resolve_run(config)
    participants = sorted({i.participant for i in [*items, *problems]})
    try:
        config.work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BidsClError(f"cannot create the work directory {config.work_dir}: {exc.strerror}",
                          EXIT_CANNOT_CREATE_OUTPUT) from None
    locks = lock_work_dir(config.work_dir, participants)  # held until this process ends
    # Only now, with every check passed, does anything appear in the output: a refused run leaves none.
    make_output_dir(config.output_dir)
    resolved.apply_environment()
    if resolved.device == "cpu" and config.device == "auto":
        LOGGER.warning("No CUDA device found: segmenting on the CPU (slower; test-time mirroring off, "
                       "as on every CPU run).")

    worker = None
    if resolved.segment_worker == "shared" and items:
        worker = _start_segment_worker(resolved)
        resolved = dataclasses.replace(resolved, segment_worker="shared" if worker else "node",
                                       worker_address=worker.address if worker else None)
    try:
        return _run_graph(config, resolved, model_provenance, items, problems, participants,
                          log_file=log_file, locks=locks)
    finally:
        if worker is not None:
            worker.stop()


def _start_segment_worker(resolved: ResolvedRun) -> WorkerHandle | None:
    from bids_cl.engine.worker import WorkerUnavailable, start_worker
    from bids_cl.utils.resources import segment_threads

    try:
        worker = start_worker(nthreads=segment_threads(resolved.omp_nthreads,
                                                       gpu=resolved.device == "cuda"))
    except WorkerUnavailable as exc:
        LOGGER.warning("%s: each segmentation node loads the model itself", exc)
        return None
    LOGGER.info("Shared segmentation worker (pid %d) at %s", worker.process.pid, worker.address)
    return worker


def _run_graph(config: RunConfig, resolved: ResolvedRun, model_provenance: dict[str, Any],
               items: list[WorkItem], problems: list[WorkItem], participants: list[str], *,
               log_file: Path, locks: list[Any]) -> int:
    from bids_cl.workflows.base import collect_methods, init_bids_cl_wf

    workflow = init_bids_cl_wf(config=config, resolved=resolved, items=items)
    try:
        writer.write_dataset_description(config.output_dir, config.bids_dir, model_provenance)
        writer.write_citation(config.output_dir, collect_methods(workflow))
        log_dirs = {
            p: writer.write_participant_log(config.output_dir, p, config.run_uuid,
                                            config_toml=config.to_toml(resolved),
                                            items=[i for i in [*items, *problems] if i.participant == p])
            for p in participants
        }
    except OSError as exc:
        raise (output_error(exc) or exc) from None

    workflow.config["execution"].update({
        "crashfile_format": "txt",
        "stop_on_first_crash": False,
        "remove_unnecessary_outputs": False,
        "hash_method": "content",
    })
    workflow.config["monitoring"] = {"enabled": False}
    plugin, plugin_args = plugin_settings(config, resolved)
    # How often Nipype checks on running nodes. Locally that is cheap; on a cluster each check is a
    # squeue/qstat call per job, which schedulers ask users to keep rare.
    workflow.config["execution"]["poll_sleep_duration"] = float(plugin_args.pop(
        "poll_sleep_duration", 0.2 if is_local_plugin(plugin) else 10.0))
    if not is_local_plugin(plugin):
        # Nipype's cluster plugins (SLURM, SGE, PBS, LSF, OAR) name each job after os.environ["LOGNAME"]
        # and raise KeyError where it is unset (containers, cron, some batch shells).
        os.environ.setdefault("LOGNAME", _user_name())
    LOGGER.info("Running %d target(s) of %d participant(s) with %s %s",
                len(items), len(participants), plugin, plugin_args)
    start = time.perf_counter()
    if items:
        try:
            workflow.run(plugin=plugin, plugin_args=plugin_args)
        except Exception as exc:  # Nipype raises when any node failed; the records say which and why
            LOGGER.debug("workflow finished with errors: %s", exc)
    elapsed = time.perf_counter() - start

    outcomes = {item.prefix: _outcome(config, item) for item in items}
    failures: list[tuple[WorkItem, str, int]] = []
    for item in problems:
        code = item.problem_code or EXIT_FAILURE
        writer.write_crash_note(log_dirs[item.participant], item.prefix, item.problem or "", code, [])
        failures.append((item, item.problem or "", code))
    for item in items:
        record = outcomes[item.prefix]
        if not record.ok:
            crash_files = sorted(str(p) for p in (log_dirs[item.participant] / spec.NIPYPE_CRASH_DIR
                                                  ).glob("crash-*"))
            writer.write_crash_note(log_dirs[item.participant], item.prefix, record.reason or "",
                                    record.exit_code, crash_files)
            failures.append((item, record.reason or "", record.exit_code))

    failures.extend(_change_outcomes(config, items, problems, outcomes, log_dirs))

    for participant, log_dir in log_dirs.items():
        writer.write_timings(log_dir, {i.prefix: outcomes[i.prefix].timings for i in items
                                       if i.participant == participant and outcomes[i.prefix].ok})
        shutil.copyfile(log_file, log_dir / spec.LOG_NAME)
    _write_reports(config, participants)

    for item in items:
        if outcomes[item.prefix].ok:
            summary = json.loads((config.output_dir / item.anat_dir
                                  / spec.output_name(item.prefix, "summary")).read_text())
            print(f"{item.prefix}: {summary['LesionCount']} cortical lesion(s), "
                  f"{summary['TotalVolume_uL']:.1f} uL", file=sys.stdout)
    LOGGER.info("Finished in %.1f s", elapsed)
    for handle in locks:
        handle.close()
    if not failures:
        return EXIT_OK
    for item, reason, code in failures:
        print(f"bids_cl: error: {item.prefix} failed (exit {code}): {reason} "
              f"[log: {log_dirs[item.participant]}]", file=sys.stderr)
    codes = {code for _, _, code in failures}
    return codes.pop() if len(codes) == 1 else EXIT_FAILURE


def _change_outcomes(config: RunConfig, items: list[WorkItem], problems: list[Any],
                     outcomes: dict[str, TargetRecord], log_dirs: dict[str, Path]
                     ) -> list[tuple[Any, str, int]]:
    """Report the lesion change pairs (docs/longitudinal.md): ok -> one stdout line; a session that
    cannot be paired, a pair with a failed session or a refused alignment -> a warning (the sessions'
    own outputs are complete); a pair that failed by itself -> a failure with its exit code."""
    from types import SimpleNamespace

    from bids_cl.derivatives.records import STATUS_REFUSED
    from bids_cl.longitudinal.pairs import plan_pairs
    from bids_cl.workflows.longitudinal import pair_record_file

    if config.longitudinal != "auto":
        return []
    pairs, warnings = plan_pairs(items, problems)
    for line in warnings:
        LOGGER.warning(line)
    failures: list[tuple[Any, str, int]] = []
    for pair in pairs:
        failed = [i.prefix for i in (pair.earlier, pair.later) if not outcomes[i.prefix].ok]
        if failed:
            LOGGER.warning("%s: no lesion change computed: %s failed", pair.name, " and ".join(failed))
            continue
        path = pair_record_file(config, pair)
        try:
            record = TargetRecord.read(path)
        except (OSError, ValueError):
            record = TargetRecord(prefix=pair.name, status=STATUS_FAILED, exit_code=EXIT_FAILURE,
                                  reason="the lesion change step stopped before it finished (no record; "
                                  "see the Nipype crash files)")
        if record.status == STATUS_REFUSED:
            LOGGER.warning("%s: %s", pair.name, record.reason)
        elif record.ok:
            summary = json.loads((config.output_dir / pair.later.anat_dir / spec.change_name(
                pair.later.prefix, "change_summary", earlier=str(pair.earlier.session))).read_text())
            print(f"{pair.later.prefix}: since ses-{pair.earlier.session}: {summary['New']} new, "
                  f"{summary['Enlarging']} enlarging, {summary['Stable']} stable, {summary['Shrinking']} "
                  f"shrinking, {summary['Disappeared']} disappeared lesion(s)", file=sys.stdout)
        else:
            log_dir = log_dirs[pair.later.participant]
            crash_files = sorted(str(p) for p in (log_dir / spec.NIPYPE_CRASH_DIR).glob("crash-*"))
            writer.write_crash_note(log_dir, pair.name, record.reason or "", record.exit_code, crash_files)
            failures.append((SimpleNamespace(prefix=pair.name, participant=pair.later.participant),
                             record.reason or "", record.exit_code))
    return failures


def lock_work_dir(work_dir: Path, participants: list[str]) -> list[Any]:
    """Take each participant's lock in the work folder, or refuse with one line (exit 73).

    Two runs sharing a work folder would run the same Nipype nodes in the same folders at once; runs of
    different participants may share one. ``flock`` locks go away with the process, so a killed run never
    leaves a stale lock behind.
    """
    import fcntl

    handles = []
    for participant in participants:
        path = work_dir / f".bids_cl-lock-sub-{participant}"
        handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            for held in handles:
                held.close()
            raise BidsClError(
                f"the work folder {work_dir} is in use for sub-{participant} by another bids_cl run "
                f"({holder}); wait for it to finish, or give this run its own -w/--work-dir",
                EXIT_CANNOT_CREATE_OUTPUT) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        handles.append(handle)
    return handles


def check_creatable(path: Path, what: str) -> None:
    """Exit 73 (one line) now, creating nothing, when ``path`` could not be created or written later."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BidsClError(f"cannot create the {what} {path}: {existing} is not a directory",
                          EXIT_CANNOT_CREATE_OUTPUT)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BidsClError(f"cannot create the {what} {path}: {existing} is not writable",
                          EXIT_CANNOT_CREATE_OUTPUT)


def make_output_dir(path: Path) -> None:
    """Create the output folder and prove it is writable (exit 73, one line, otherwise)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".bids_cl-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise BidsClError(
            f"cannot create the output directory {path}: {exc.strerror or exc}",
            EXIT_CANNOT_CREATE_OUTPUT,
        ) from None


def _write_reports(config: RunConfig, participants: list[str]) -> None:
    from bids_cl.reports import generate_participant_report

    for participant in participants:
        try:
            generate_participant_report(config.output_dir, participant)
        except Exception as exc:  # a report problem must not fail a finished segmentation
            LOGGER.warning("report for sub-%s failed: %s", participant, exc)
