"""CPU and memory defaults: options, then Slurm, then the machine (bids_cl/utils/resources.py)."""

from __future__ import annotations

import pytest

from bids_cl.errors import EXIT_USAGE, BidsClError
from bids_cl.utils import resources
from bids_cl.utils.resources import effective_cpus, effective_mem_mb, parse_mem_mb


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the process may run on 8 CPUs, whatever machine runs the tests."""
    monkeypatch.setattr(
        resources.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False
    )


def test_cpus_default_to_affinity(eight_cpus: None) -> None:
    assert effective_cpus(env={}) == (8, 8)


def test_cpus_follow_slurm_allocation(eight_cpus: None) -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "4", "SLURM_CPUS_ON_NODE": "8"}
    assert effective_cpus(env=env) == (4, 4)


def test_cpus_fall_back_to_cpus_on_node(eight_cpus: None) -> None:
    # sbatch -n 3 without --cpus-per-task: Slurm only says how many CPUs the job has on this node.
    assert effective_cpus(env={"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "3"}) == (3, 3)


def test_slurm_list_syntax_is_read(eight_cpus: None) -> None:
    assert effective_cpus(env={"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "2(x3)"}) == (2, 2)


def test_explicit_options_win_but_stay_within_allocation(eight_cpus: None) -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "4"}
    assert effective_cpus(2, 1, env=env) == (2, 1)
    assert effective_cpus(16, env=env) == (4, 4)  # never more than allocated
    assert effective_cpus(3, 8, env=env) == (3, 3)  # threads never exceed processes


def test_gpu_runs_leave_room_beside_the_segmentation_node(eight_cpus: None) -> None:
    """On a GPU run the segment node holds GPU_NODE_CPUS slots; the default threads of every other step
    leave them free, so MultiProc can run another participant's CPU step beside the GPU."""
    from bids_cl.utils.resources import GPU_NODE_CPUS

    plan = effective_cpus(env={}, gpu=True)
    assert plan == (8, 8 - GPU_NODE_CPUS)
    assert effective_cpus(8, 8, env={}, gpu=True) == (8, 8)  # an explicit --omp-nthreads wins
    assert effective_cpus(2, env={}, gpu=True) == (2, 1)  # never below one thread
    assert effective_cpus(env={}) == (8, 8)  # the CPU default is unchanged


def test_never_more_than_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert effective_cpus(env={"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "32"}) == (2, 2)
    assert effective_cpus(nprocs=8, env={}) == (2, 2)


def test_real_machine_answer_is_sane() -> None:
    nprocs, omp = effective_cpus(env={})
    assert 1 <= omp <= nprocs <= resources.available_cpus()


@pytest.mark.parametrize("bad", [0, -2, "many"])
def test_bad_cpu_options_are_usage_errors(eight_cpus: None, bad: object) -> None:
    with pytest.raises(BidsClError) as info:
        effective_cpus(nprocs=bad, env={})  # type: ignore[arg-type]
    assert info.value.code == EXIT_USAGE


@pytest.mark.parametrize(
    ("text", "mb"),
    [("16000", 16000), ("16000M", 16000), ("16G", 16384), ("1.5g", 1536), ("1T", 1048576),
     ("2048K", 2), ("8GB", 8192), (512, 512)],
)
def test_parse_mem_mb(text: str | int, mb: int) -> None:
    assert parse_mem_mb(text) == mb


@pytest.mark.parametrize("bad", ["", "lots", "16Q", "0", "-1G"])
def test_parse_mem_mb_rejects(bad: str) -> None:
    with pytest.raises(BidsClError):
        parse_mem_mb(bad)


def test_mem_from_slurm_per_node() -> None:
    assert effective_mem_mb(env={"SLURM_JOB_ID": "7", "SLURM_MEM_PER_NODE": "16000"}) == 16000


def test_mem_from_slurm_per_cpu() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_MEM_PER_CPU": "2000", "SLURM_CPUS_PER_TASK": "4"}
    assert effective_mem_mb(env=env) == 8000


def test_mem_explicit_wins_within_allocation() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_MEM_PER_NODE": "16000"}
    assert effective_mem_mb(8000, env=env) == 8000
    assert effective_mem_mb("32G", env=env) == 16000
    assert effective_mem_mb("4G", env={}) == 4096


def test_mem_zero_means_whole_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "cgroup_mem_mb", lambda: None)
    monkeypatch.setattr(resources, "physical_mem_mb", lambda: 24000)
    assert effective_mem_mb(env={"SLURM_JOB_ID": "7", "SLURM_MEM_PER_NODE": "0"}) == 24000


def test_mem_outside_slurm_is_smallest_machine_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "cgroup_mem_mb", lambda: 4000)
    monkeypatch.setattr(resources, "physical_mem_mb", lambda: 24000)
    assert effective_mem_mb(env={}) == 4000
    monkeypatch.setattr(resources, "cgroup_mem_mb", lambda: None)
    assert effective_mem_mb(env={}) == 24000


def test_real_machine_memory_is_positive() -> None:
    mem = effective_mem_mb(env={})
    assert mem is None or mem > 0
