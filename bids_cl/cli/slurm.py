"""``bids_cl-slurm``: write (and optionally submit) a Slurm job array, one participant per task.

The NiPreps way of running a BIDS-App on a cluster (shared/reference/bids-apps.md, E.2): one array task
per participant, each on node-local scratch with the allocation passed down as --nprocs/--omp-nthreads/
--mem-mb, a status line per task in a shared TSV, and the group level as a separate job that waits for
the whole array (``afterany``: it still summarises when some participants failed).

Written into the jobs folder (``-o``)::

    participants.txt        one label per line; array task i processes line i
    participant.sbatch      the job array
    group.sbatch            the group level
    submit.sh               submits both with the dependency (what --submit does)
    status.tsv              participant_id, task_id, exit_code, start, end (one row per finished task;
                            the group job adds a row whose participant_id is "group")
    logs/                   Slurm's stdout/stderr per task
    submitted.json          job ids, after --submit
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bids_cl import __version__
from bids_cl.errors import (
    EXIT_FAILURE,
    EXIT_MISSING_INPUT,
    EXIT_NO_DATA_SELECTED,
    EXIT_OK,
    EXIT_USAGE,
    BidsClError,
)
from bids_cl.utils.cli import UsageParser, run_command
from bids_cl.utils.resources import parse_mem_mb

STATUS_HEADER = "participant_id\ttask_id\texit_code\tstart\tend\n"
DEFAULT_WORK_ROOT = "${TMPDIR:-/tmp}"
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
# Values that end up on #SBATCH lines: no spaces, quotes or newlines (nothing a shell would re-read).
_SBATCH_VALUE_RE = re.compile(r"^[\w.,:+=@/%-]+$")
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$|^UNLIMITED$|^INFINITE$")


@dataclass
class SlurmPlan:
    """Everything the job scripts are made of (paths absolute, values validated)."""

    bids_dir: Path
    out_dir: Path
    jobs_dir: Path
    labels: list[str]
    image: Path | None = None
    launcher: list[str] | None = None  # --bids-cl-cmd: replaces the container / bids_cl prefix
    partition: str | None = None
    account: str | None = None
    gpus: int = 0
    cpus: int = 4
    mem: str = "16G"
    time: str = "04:00:00"
    group_mem: str = "4G"
    group_time: str = "01:00:00"
    work_root: str = DEFAULT_WORK_ROOT
    keep_work: bool = False
    max_parallel: int | None = None
    job_name: str = "bids_cl"
    extra_args: list[str] = field(default_factory=list)
    group_args: list[str] = field(default_factory=list)
    templateflow_home: Path | None = None
    binds: list[str] = field(default_factory=list)
    network_none: bool = False
    with_group: bool = True
    prologue: str = ""  # shell lines run first on the node, e.g. "module load apptainer"


# ------------------------------------------------------------------------------------------------
# Participants


def _clean_label(label: str) -> str:
    label = label.strip()
    label = label[4:] if label.startswith("sub-") else label
    if not _LABEL_RE.match(label):
        raise BidsClError(f"{label!r} is not a BIDS participant label (letters and digits)",
                          EXIT_USAGE)
    return label


def _labels_from_participants_tsv(tsv: Path) -> list[str]:
    """The participant_id column of participants.tsv, in file order."""
    lines = tsv.read_text().splitlines()
    if not lines:
        return []
    header = lines[0].split("\t")
    if "participant_id" not in header:
        raise BidsClError(f"{tsv} has no participant_id column", EXIT_USAGE)
    column = header.index("participant_id")
    labels = []
    for line in lines[1:]:
        cells = line.split("\t")
        if line.strip() and len(cells) > column and cells[column].strip():
            labels.append(_clean_label(cells[column]))
    return labels


def participant_labels(bids_dir: Path, requested: list[str] | None = None) -> list[str]:
    """Labels to run: the requested ones, else participants.tsv, else the sub-* folders.

    Labels without a sub-<label> folder are dropped with a warning: an array task for them would only
    fail with "no data" (exit 18) after waiting in the queue.
    """
    present = {p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir()}
    if requested:
        labels = [_clean_label(x) for x in requested]
    elif (bids_dir / "participants.tsv").is_file():
        labels = _labels_from_participants_tsv(bids_dir / "participants.tsv")
    else:
        labels = sorted(present)
    labels = list(dict.fromkeys(labels))  # unique, order kept
    missing = [x for x in labels if x not in present]
    for label in missing:
        print(f"bids_cl-slurm: warning: no folder sub-{label} in {bids_dir}: skipped",
              file=sys.stderr)
    labels = [x for x in labels if x in present]
    if not labels:
        raise BidsClError(f"no participants to run in {bids_dir}", EXIT_NO_DATA_SELECTED)
    return labels


def unfinished_labels(jobs_dir: Path) -> list[str]:
    """Participants of the last generation in ``jobs_dir`` whose latest status is not exit 0.

    A participant with no status row at all counts too: its task never reached the end of its
    script (node failure, or not run yet).
    """
    listed = jobs_dir / "participants.txt"
    if not listed.is_file():
        raise BidsClError(f"--rerun-failed: {listed} does not exist", EXIT_MISSING_INPUT)
    last_code: dict[str, str] = {}
    status = jobs_dir / "status.tsv"
    if status.is_file():
        for line in status.read_text().splitlines()[1:]:
            cells = line.split("\t")
            if len(cells) >= 3 and cells[0].startswith("sub-"):
                last_code[cells[0][4:]] = cells[2]
    labels = [x for x in listed.read_text().split() if last_code.get(x) != "0"]
    if not labels:
        raise BidsClError(f"--rerun-failed: every participant in {listed} succeeded",
                          EXIT_NO_DATA_SELECTED)
    return labels


# ------------------------------------------------------------------------------------------------
# Script text


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _sbatch_lines(plan: SlurmPlan, *, group: bool) -> list[str]:
    """#SBATCH directives for the array (group=False) or the group job."""
    name = f"{plan.job_name}-group" if group else plan.job_name
    lines = [f"#SBATCH --job-name={name}"]
    if group:
        lines += ["#SBATCH --cpus-per-task=1", f"#SBATCH --mem={plan.group_mem}",
                  f"#SBATCH --time={plan.group_time}",
                  f"#SBATCH --output={plan.jobs_dir}/logs/%x-%j.out"]
    else:
        throttle = f"%{plan.max_parallel}" if plan.max_parallel else ""
        lines += [f"#SBATCH --array=1-{len(plan.labels)}{throttle}",
                  f"#SBATCH --cpus-per-task={plan.cpus}", f"#SBATCH --mem={plan.mem}",
                  f"#SBATCH --time={plan.time}",
                  f"#SBATCH --output={plan.jobs_dir}/logs/%x-%A_%a.out"]
        if plan.gpus:
            lines.append(f"#SBATCH --gres=gpu:{plan.gpus}")
    if plan.partition:
        lines.append(f"#SBATCH --partition={plan.partition}")
    if plan.account:
        lines.append(f"#SBATCH --account={plan.account}")
    return lines


def _launcher_lines(plan: SlurmPlan, *, gpu: bool) -> list[str]:
    """Bash that fills the array ``cmd`` with the program to run (before bids_cl's arguments)."""
    if plan.launcher:
        return [f"cmd=({' '.join(_q(a) for a in plan.launcher)})"]
    if plan.image is None:
        return [f"cmd=({_q(_local_bids_cl())})"]
    binds = [f"{plan.bids_dir}:{plan.bids_dir}:ro", f"{plan.out_dir}:{plan.out_dir}"]
    binds += plan.binds
    lines = [
        # Neither on PATH: "apptainer: command not found", recorded as exit 127 like any failure.
        'runtime="$(command -v apptainer || command -v singularity || echo apptainer)"',
        # --cleanenv: host PYTHONPATH & co. never leak in. --home on scratch: the image's HOME is
        # read-only and a shared ~/.cache would be written by every task at once.
        'cmd=("$runtime" run --cleanenv --home "$work/home" -B "$work:$work"',
    ]
    lines += [f"     -B {_q(b)}" for b in binds]
    if plan.templateflow_home:
        lines.append(f"     -B {_q(f'{plan.templateflow_home}:/templateflow:ro')}"
                     " --env TEMPLATEFLOW_HOME=/templateflow")
    if gpu:
        lines.append("     --nv")
    if plan.network_none:
        lines.append("     --net --network none")
    lines.append(f"     {_q(plan.image)})")
    return lines


def _local_bids_cl() -> str:
    """The bids_cl of the environment running this generator (sbatch jobs may get another PATH)."""
    sibling = Path(sys.executable).parent / "bids_cl"
    if sibling.is_file():
        return str(sibling)
    return shutil.which("bids_cl") or "bids_cl"


_COMMON_SETUP = r"""
{prologue}
export NIPYPE_NO_ET=1 NO_ET=1 TEMPLATEFLOW_AUTOUPDATE=0{tf_export}
jobs_dir={jobs_dir}
status_file="$jobs_dir/status.tsv"
start="$(date -Iseconds)"

record_status() {{
    # One line per job; flock so that tasks finishing together never interleave their lines
    # (flock works on local disks and NFSv4; the lock file sits beside the status file).
    local line
    line="$(printf '%s\t%s\t%s\t%s\t%s' "$1" "$2" "$3" "$start" "$(date -Iseconds)")"
    (
        flock -w 300 9 || echo "bids_cl-slurm: could not lock $status_file" >&2
        printf '%s\n' "$line" >>"$status_file"
    ) 9>>"$status_file.lock"
}}

# Node-local work directory: Nipype's many small files stay off the shared filesystem.
work_root="{work_root}"
[ -n "$work_root" ] || work_root=/tmp
work="$work_root/bids_cl-{work_tag}"
mkdir -p "$work/home" || {{ echo "bids_cl-slurm: cannot create $work" >&2; exit 73; }}
# The output folder must exist before a container can bind it (mkdir -p is safe when tasks race).
mkdir -p {out_dir} || {{ echo "bids_cl-slurm: cannot create {out_dir}" >&2; exit 73; }}
cleanup() {{ {cleanup}; }}

# Resources from the allocation (the #SBATCH lines above may have been edited since generation).
nprocs="${{SLURM_CPUS_PER_TASK:-{cpus}}}"
omp_nthreads="$nprocs"
if [ "${{SLURM_MEM_PER_NODE:-0}}" -gt 0 ] 2>/dev/null; then
    alloc_mb="$SLURM_MEM_PER_NODE"
elif [ "${{SLURM_MEM_PER_CPU:-0}}" -gt 0 ] 2>/dev/null; then
    alloc_mb=$(( SLURM_MEM_PER_CPU * nprocs ))
else
    alloc_mb={mem_mb}
fi
# 10 % (at least 512 MB) below the allocation: Python, the container runtime and the page cache are
# outside Nipype's accounting, and Slurm kills the job at the limit.
headroom=$(( alloc_mb / 10 > 512 ? alloc_mb / 10 : 512 ))
mem_mb=$(( alloc_mb - headroom > 256 ? alloc_mb - headroom : 256 ))
"""

_RUN_AND_RECORD = r"""
echo "bids_cl-slurm: $(date -Iseconds) on $(hostname): {what}"
echo "bids_cl-slurm: nprocs=$nprocs omp_nthreads=$omp_nthreads mem_mb=$mem_mb work=$work"
printf 'bids_cl-slurm: command:'; printf ' %q' "${{cmd[@]}}" "${{args[@]}}"; echo

# Run in the background and wait, so that Slurm's SIGTERM at the time limit reaches the trap at once
# and the task is still recorded (exit 143) before the SIGKILL.
on_term() {{
    kill -TERM "$child" 2>/dev/null
    wait "$child" 2>/dev/null
    record_status {who} {task} 143
    cleanup
    exit 143
}}
trap on_term TERM INT
"${{cmd[@]}}" "${{args[@]}}" &
child=$!
wait "$child"
rc=$?
trap - TERM INT
record_status {who} {task} "$rc"
cleanup
echo "bids_cl-slurm: $(date -Iseconds): exit code $rc"
exit "$rc"
"""


def _header(plan: SlurmPlan, what: str) -> list[str]:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ["#!/bin/bash", f"# {what}", f"# Written by bids_cl-slurm {__version__} on {stamp}; "
            f"submit both jobs with: bash {plan.jobs_dir}/submit.sh"]


def _setup(plan: SlurmPlan, work_tag: str, cpus: int, mem: str) -> str:
    cleanup = ":" if plan.keep_work else 'rm -rf -- "$work"'
    # Without a container the prefetched TemplateFlow home is exported; a container gets a bind.
    tf_export = ""
    if plan.templateflow_home is not None and plan.image is None:
        tf_export = f"\nexport TEMPLATEFLOW_HOME={_q(plan.templateflow_home)}"
    return _COMMON_SETUP.format(jobs_dir=_q(plan.jobs_dir), work_root=plan.work_root,
                                work_tag=work_tag, cleanup=cleanup, cpus=cpus,
                                mem_mb=parse_mem_mb(mem), tf_export=tf_export,
                                out_dir=_q(plan.out_dir),
                                prologue=f"# --prologue\n{plan.prologue}\n" if plan.prologue else "")


def _args_line(plan: SlurmPlan, level: str, extra: list[str], label: bool) -> str:
    parts = [_q(plan.bids_dir), _q(plan.out_dir), level]
    if label:
        parts.append('--participant-label "$label"')
    parts += ['-w "$work/wd"', '--nprocs "$nprocs"', '--omp-nthreads "$omp_nthreads"',
              '--mem-mb "$mem_mb"']
    parts += [_q(a) for a in extra]
    return f"args=({' '.join(parts)})"


def render_participant_script(plan: SlurmPlan) -> str:
    """The job array: task i runs participant i of participants.txt."""
    lines = _header(plan, "bids_cl participant level: one participant per array task.")
    lines += _sbatch_lines(plan, group=False)
    lines.append(_setup(plan, "${SLURM_ARRAY_JOB_ID:-0}_${SLURM_ARRAY_TASK_ID:-0}", plan.cpus,
                        plan.mem))
    lines += [
        'task_id="${SLURM_ARRAY_JOB_ID:-0}_${SLURM_ARRAY_TASK_ID:-0}"',
        'label="$(sed -n "${SLURM_ARRAY_TASK_ID:-1}p" "$jobs_dir/participants.txt")"',
        'if [ -z "$label" ]; then',
        '    echo "bids_cl-slurm: no participant on line ${SLURM_ARRAY_TASK_ID:-?}" >&2',
        '    record_status "?" "$task_id" 64; cleanup; exit 64',
        "fi",
    ]
    lines += _launcher_lines(plan, gpu=plan.gpus > 0)
    lines.append(_args_line(plan, "participant", plan.extra_args, label=True))
    lines.append(_RUN_AND_RECORD.format(what="participant sub-$label", who='"sub-$label"',
                                        task='"$task_id"'))
    return "\n".join(lines) + "\n"


def render_group_script(plan: SlurmPlan) -> str:
    """The group level, submitted to run after the whole array (afterany)."""
    lines = _header(plan, "bids_cl group level: runs once the participant array has ended.")
    lines += _sbatch_lines(plan, group=True)
    lines.append(_setup(plan, "group_${SLURM_JOB_ID:-0}", 1, plan.group_mem))
    lines += [
        "# The participants' outcome, for the log: failed ones are left out of the group tables.",
        'if [ -s "$status_file" ]; then',
        "    awk -F'\\t' 'NR > 1 && $1 != \"group\" { n++; if ($3 != 0) { bad++; "
        "print \"bids_cl-slurm: participant \" $1 \" failed (exit \" $3 \")\" } } "
        "END { printf \"bids_cl-slurm: %d participant task(s) ended, %d failed\\n\", n, bad }' "
        '"$status_file"',
        "fi",
    ]
    lines += _launcher_lines(plan, gpu=False)
    lines.append(_args_line(plan, "group", plan.group_args, label=False))
    lines.append(_RUN_AND_RECORD.format(what="group level", who="group",
                                        task='"${SLURM_JOB_ID:-0}"'))
    return "\n".join(lines) + "\n"


def render_submit_script(plan: SlurmPlan) -> str:
    """Submits the array, then the group job after it (what --submit does)."""
    lines = [
        "#!/bin/bash",
        "# Submit the participant array, then the group level after it (afterany: the group level",
        "# still runs, and summarises, when some participants failed).",
        "set -euo pipefail",
        f"cd {_q(plan.jobs_dir)}",
        "array_id=$(sbatch --parsable participant.sbatch)",
        'array_id="${array_id%%;*}"',
        'echo "participant array job: $array_id"',
    ]
    if plan.with_group:
        lines += [
            'group_id=$(sbatch --parsable --dependency="afterany:$array_id" group.sbatch)',
            'echo "group job: ${group_id%%;*}"',
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Writing and submitting


def write_jobs(plan: SlurmPlan) -> dict[str, Path]:
    """Write the jobs folder; returns the paths of what was written."""
    try:
        (plan.jobs_dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BidsClError(f"cannot create {plan.jobs_dir}: {exc.strerror or exc}", 73) from None
    paths = {
        "participants": plan.jobs_dir / "participants.txt",
        "participant": plan.jobs_dir / "participant.sbatch",
        "group": plan.jobs_dir / "group.sbatch",
        "submit": plan.jobs_dir / "submit.sh",
        "status": plan.jobs_dir / "status.tsv",
    }
    paths["participants"].write_text("".join(f"{x}\n" for x in plan.labels))
    paths["participant"].write_text(render_participant_script(plan))
    paths["group"].write_text(render_group_script(plan))
    paths["submit"].write_text(render_submit_script(plan))
    for key in ("participant", "group", "submit"):
        paths[key].chmod(0o755)
    if not paths["status"].exists():  # kept across regenerations: it is the history of the runs
        paths["status"].write_text(STATUS_HEADER)
    return paths


def _sbatch(args: list[str]) -> str:
    """Run sbatch --parsable; the job id (without a ;cluster suffix)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise BidsClError("sbatch is not on PATH: submit from a Slurm login node", EXIT_FAILURE)
    proc = subprocess.run([sbatch, "--parsable", *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise BidsClError(f"sbatch failed: {message[-1] if message else proc.returncode}",
                          EXIT_FAILURE)
    return proc.stdout.strip().split(";")[0]


def submit(plan: SlurmPlan, paths: dict[str, Path]) -> dict[str, str | None]:
    """Submit the array, then the group job with afterany on it; records the ids in submitted.json."""
    array_id = _sbatch([str(paths["participant"])])
    group_id = None
    if plan.with_group:
        group_id = _sbatch([f"--dependency=afterany:{array_id}", str(paths["group"])])
    ids = {"array_job_id": array_id, "group_job_id": group_id}
    record = {**ids, "participants": plan.labels,
              "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (plan.jobs_dir / "submitted.json").write_text(json.dumps(record, indent=2) + "\n")
    return ids


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="bids_cl-slurm",
        description="Write a Slurm job array that runs bids_cl on one participant per task, and "
        "a group-level job that runs after it; --submit submits both. See docs/hpc.md.",
    )
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    parser.add_argument("out_dir", type=Path, help="the bids_cl output (derivatives) folder")
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--image", type=Path, metavar="SIF",
                     help="run the bids_cl Apptainer/Singularity image")
    run.add_argument("--no-container", action="store_true",
                     help="run the bids_cl of this Python environment")
    run.add_argument("--bids-cl-cmd", metavar="CMD",
                     help="run this command instead of bids_cl (quoted; for tests and wrappers)")
    g = parser.add_argument_group("Resources (per participant task)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--gpus", type=int, default=0, metavar="N",
                   help="GPUs per task (--gres=gpu:N; the container runs with --nv)")
    g.add_argument("--cpus-per-task", type=int, default=4, metavar="N", help="(default 4)")
    g.add_argument("--mem", default="16G",
                   help="memory per task, Slurm syntax: 16G, 16000M (default 16G)")
    g.add_argument("--time", default="04:00:00", help="time limit per task (default 04:00:00)")
    g.add_argument("--max-parallel", type=int, metavar="N",
                   help="at most N tasks at once (array throttle %%N)")
    g.add_argument("--group-mem", default="4G", help="memory of the group job (default 4G)")
    g.add_argument("--group-time", default="01:00:00",
                   help="time limit of the group job (default 01:00:00)")
    g = parser.add_argument_group("Run")
    g.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="default: participants.tsv, else every sub-* folder")
    g.add_argument("--rerun-failed", action="store_true",
                   help="only the participants of the previous submission in the jobs folder "
                   "whose last status is not exit 0")
    g.add_argument("--work-root", default=DEFAULT_WORK_ROOT, metavar="DIR",
                   help="node-local scratch for the work folders; shell variables are expanded "
                   "on the node (quote them: '$TMPDIR', '/scratch/$USER'); default "
                   "${TMPDIR:-/tmp}")
    g.add_argument("--keep-work", action="store_true",
                   help="keep each task's work folder (default: removed when the task ends)")
    g.add_argument("--extra-args", default="", metavar="'ARGS'",
                   help="more bids_cl options for each participant, one quoted string "
                   "(a single option needs '=': --extra-args=--disable-tta)")
    g.add_argument("--group-args", default="", metavar="'ARGS'",
                   help="more bids_cl options for the group level")
    g.add_argument("--no-group", action="store_true", help="no group-level job")
    g.add_argument("--templateflow-home", type=Path, metavar="DIR",
                   help="a TemplateFlow folder prefetched on a login node (bound into the "
                   "container at /templateflow; exported as TEMPLATEFLOW_HOME without one)")
    g.add_argument("--bind", action="append", default=[], metavar="SRC[:DST[:OPTS]]",
                   help="more container binds (repeatable)")
    g.add_argument("--network-none", action="store_true",
                   help="run the container without network (apptainer --net --network none)")
    g.add_argument("--prologue", default="", metavar="'SHELL'",
                   help="shell lines each job runs first, e.g. 'module load apptainer'")
    g.add_argument("--job-name", default="bids_cl", help="(default bids_cl)")
    g.add_argument("-o", "--jobs-dir", type=Path, default=Path("bids_cl_slurm"),
                   help="where the job scripts, logs and status.tsv go, on a shared filesystem "
                   "(default ./bids_cl_slurm)")
    g.add_argument("--submit", action="store_true", help="submit the jobs with sbatch")
    parser.add_argument("--version", action="version", version=f"bids_cl-slurm {__version__}")
    return parser


def _split(text: str, option: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise BidsClError(f"{option}: {exc}", EXIT_USAGE) from None


def _check_sbatch_value(value: str | None, option: str) -> None:
    if value is not None and not _SBATCH_VALUE_RE.match(value):
        raise BidsClError(f"{option} {value!r} has characters Slurm does not accept", EXIT_USAGE)


def _check_numbers(args: argparse.Namespace) -> None:
    if args.cpus_per_task < 1 or args.gpus < 0:
        raise BidsClError("--cpus-per-task must be >= 1 and --gpus >= 0", EXIT_USAGE)
    if args.max_parallel is not None and args.max_parallel < 1:
        raise BidsClError("--max-parallel must be >= 1", EXIT_USAGE)
    for option, value in (("--time", args.time), ("--group-time", args.group_time)):
        if not _TIME_RE.match(value):
            raise BidsClError(f"{option} {value!r} is not a Slurm time (e.g. 04:00:00, 1-12:00:00)",
                              EXIT_USAGE)
    for option, value in (("--mem", args.mem), ("--group-mem", args.group_mem)):
        parse_mem_mb(value)
        _check_sbatch_value(value, option)
    for option in ("partition", "account", "job_name"):
        _check_sbatch_value(getattr(args, option), "--" + option.replace("_", "-"))
    if re.search(r'["`\n\\]', args.work_root):
        raise BidsClError("--work-root must not contain quotes, backquotes or backslashes",
                          EXIT_USAGE)


def plan_from_args(args: argparse.Namespace) -> SlurmPlan:
    """Validate the options into a SlurmPlan (raises BidsClError with an exit code)."""
    if args.image is None and not args.no_container and args.bids_cl_cmd is None:
        raise BidsClError("give --image bids_cl.sif, or --no-container to use the bids_cl on "
                          "PATH", EXIT_USAGE)
    _check_numbers(args)
    bids_dir = args.bids_dir.expanduser().resolve()
    if not bids_dir.is_dir():
        raise BidsClError(f"the BIDS directory {args.bids_dir} does not exist", EXIT_MISSING_INPUT)
    image = args.image.expanduser().resolve() if args.image else None
    if image is not None and not image.exists():
        raise BidsClError(f"the image {args.image} does not exist (build it with apptainer build; "
                          "see docs/hpc.md)", EXIT_MISSING_INPUT)
    tf_home = args.templateflow_home.expanduser().resolve() if args.templateflow_home else None
    requested = args.participant_label
    if args.rerun_failed:
        requested = unfinished_labels(args.jobs_dir.expanduser().resolve())
    if tf_home is not None and not tf_home.is_dir():
        raise BidsClError(f"--templateflow-home {tf_home} does not exist", EXIT_MISSING_INPUT)
    jobs_dir = args.jobs_dir.expanduser().resolve()
    if re.search(r"\s", str(jobs_dir)):
        # #SBATCH --output takes no quoting.
        raise BidsClError(f"the jobs folder {jobs_dir} must not contain spaces", EXIT_USAGE)
    return SlurmPlan(
        bids_dir=bids_dir,
        out_dir=args.out_dir.expanduser().resolve(),
        jobs_dir=jobs_dir,
        labels=participant_labels(bids_dir, requested),
        image=image,
        launcher=_split(args.bids_cl_cmd, "--bids-cl-cmd") if args.bids_cl_cmd else None,
        partition=args.partition, account=args.account, gpus=args.gpus,
        cpus=args.cpus_per_task, mem=args.mem, time=args.time, group_mem=args.group_mem,
        group_time=args.group_time, work_root=args.work_root, keep_work=args.keep_work,
        max_parallel=args.max_parallel, job_name=args.job_name,
        extra_args=_split(args.extra_args, "--extra-args"),
        group_args=_split(args.group_args, "--group-args"),
        templateflow_home=tf_home, binds=list(args.bind), network_none=args.network_none,
        with_group=not args.no_group, prologue=args.prologue,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bids_cl-slurm``; returns the exit code."""
    return run_command("bids_cl-slurm", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_from_args(args)
    paths = write_jobs(plan)
    print(f"bids_cl-slurm: {len(plan.labels)} participant task(s) written to {plan.jobs_dir}")
    if not args.submit:
        print(f"bids_cl-slurm: submit with: bash {paths['submit']}")
        return EXIT_OK
    ids = submit(plan, paths)
    print(f"participant array job: {ids['array_job_id']}")
    if ids["group_job_id"]:
        print(f"group job: {ids['group_job_id']} (after the array: afterany)")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
