"""CPU and memory a run may use: explicit options, then the Slurm allocation, then the machine.

Tools that default to "all the cores of the node" oversubscribe shared HPC nodes and get killed
for memory (shared/reference/bids-apps.md, section D: nnU-Net based CLIs that ignored the Slurm
allocation). These helpers give the configuration one answer, never more than the process may use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from bids_cl.errors import EXIT_USAGE, BidsClError

# cgroup v2 and v1 files that hold a container's or a job step's memory limit.
_CGROUP_MEMORY_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)
# cgroup v1 reports "no limit" as a huge number (page-rounded LONG_MAX): above this, no limit.
_UNLIMITED_BYTES = 1 << 60

_MEM_UNITS_MB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


class CpuPlan(NamedTuple):
    """Processes Nipype may run at once, and threads for each multi-threaded step."""

    nprocs: int
    omp_nthreads: int


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets, Slurm binding)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def _positive_int(value: object, what: str) -> int:
    """`value` as an int >= 1, or a usage error naming `what`."""
    try:
        number = int(str(value).strip())
    except ValueError as exc:
        raise BidsClError(f"{what} must be a whole number, not {value!r}", EXIT_USAGE) from exc
    if number < 1:
        raise BidsClError(f"{what} must be at least 1, not {number}", EXIT_USAGE)
    return number


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    """A positive integer environment variable, or None when unset or not a plain positive number.

    Slurm writes some counts as "4(x2)" (per-node lists); only the leading number matters here.
    """
    match = re.match(r"^\s*(\d+)", env.get(name, ""))
    if not match or int(match.group(1)) < 1:
        return None
    return int(match.group(1))


def slurm_cpus(env: Mapping[str, str] = os.environ) -> int | None:
    """CPUs Slurm gave this task: --cpus-per-task, else the CPUs of the job on this node."""
    if "SLURM_JOB_ID" not in env and "SLURM_CPUS_PER_TASK" not in env:
        return None
    return _env_int(env, "SLURM_CPUS_PER_TASK") or _env_int(env, "SLURM_CPUS_ON_NODE")


# CPU slots the segmentation node holds on a GPU run: its own CPU work is nnU-Net's preprocessing and
# the lesion table (the sliding window, ensemble and export run on the device).
GPU_NODE_CPUS = 2


def segment_threads(omp_nthreads: int, *, gpu: bool) -> int:
    """Threads of the segmentation (its node, or the run's shared worker): ``GPU_NODE_CPUS`` at most
    on a GPU run, where the device does the work, else the run's threads per process."""
    return min(omp_nthreads, GPU_NODE_CPUS) if gpu else omp_nthreads


def effective_cpus(
    nprocs: int | None = None,
    omp_nthreads: int | None = None,
    env: Mapping[str, str] = os.environ,
    *,
    gpu: bool = False,
) -> CpuPlan:
    """(nprocs, omp_nthreads) from the options, else the Slurm allocation, else the CPU affinity.

    Neither number exceeds the CPUs this process may use: Slurm without task binding (task/none)
    lets a job see the whole node, so SLURM_CPUS_PER_TASK is the limit there, and the affinity mask
    is the limit everywhere. On the CPU omp_nthreads defaults to nprocs and never exceeds it: a
    participant's targets go through the pipeline largely one step after another, and nnU-Net inference
    (the longest step) scales with threads, so giving it the whole allocation is the fastest use of it.
    On a GPU run (``gpu``) the default leaves ``GPU_NODE_CPUS`` slots free: the segmentation node holds
    only those, and another participant's skull strip or registration then fits beside it, so the GPU
    works while the CPUs do.
    """
    limit = available_cpus()
    allocated = slurm_cpus(env)
    if allocated is not None:
        limit = min(limit, allocated)
    procs = limit if nprocs is None else min(_positive_int(nprocs, "--nprocs"), limit)
    if omp_nthreads is not None:
        threads = _positive_int(omp_nthreads, "--omp-nthreads")
    elif gpu:
        threads = max(1, procs - GPU_NODE_CPUS)
    else:
        threads = procs
    return CpuPlan(procs, min(threads, procs))


def parse_mem_mb(text: str | int) -> int:
    """Megabytes from a Slurm-style size: 16000, '16000M', '16G', '1.5G', '2T' (unit MB)."""
    if isinstance(text, int):
        return _positive_int(text, "memory")
    match = _MEM_RE.match(str(text))
    if not match:
        raise BidsClError(
            f"cannot read the memory size {text!r} (e.g. 16000, 16000M, 16G)", EXIT_USAGE
        )
    value = float(match.group(1)) * _MEM_UNITS_MB[(match.group(2) or "M").upper()]
    return _positive_int(int(value), "memory (MB)")


def slurm_mem_mb(env: Mapping[str, str] = os.environ) -> int | None:
    """Memory Slurm gave this job on this node in MB; None outside Slurm or without --mem.

    SLURM_MEM_PER_NODE comes from --mem, SLURM_MEM_PER_CPU from --mem-per-cpu (times the CPUs of
    the task). Both are in MB; 0 means "all the node's memory", which is no limit for us.
    """
    per_node = _env_int(env, "SLURM_MEM_PER_NODE")
    if per_node:
        return per_node
    per_cpu = _env_int(env, "SLURM_MEM_PER_CPU")
    if per_cpu:
        return per_cpu * (slurm_cpus(env) or 1)
    return None


def cgroup_mem_mb() -> int | None:
    """This process's cgroup memory limit (docker --memory, Slurm cgroups) in MB, if any."""
    for path in _CGROUP_MEMORY_LIMITS:
        try:
            raw = path.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < _UNLIMITED_BYTES:
            return int(raw) // (1024 * 1024)
    return None


def physical_mem_mb() -> int | None:
    """Total physical memory in MB, where the platform tells."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (AttributeError, ValueError, OSError):
        return None


def effective_mem_mb(
    mem_mb: int | str | None = None, env: Mapping[str, str] = os.environ
) -> int | None:
    """Memory the run may plan for, in MB: the option, else Slurm's allocation, else the smaller of
    the cgroup limit and the physical memory; None only where none of these can be read.

    An explicit value larger than the Slurm allocation is lowered to it: the scheduler kills the
    job at its limit whatever the option says.
    """
    allocated = slurm_mem_mb(env)
    if mem_mb is not None:
        wanted = parse_mem_mb(mem_mb)
        return min(wanted, allocated) if allocated else wanted
    if allocated:
        return allocated
    limits = [m for m in (cgroup_mem_mb(), physical_mem_mb()) if m]
    return min(limits) if limits else None
