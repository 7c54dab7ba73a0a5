"""bids_cl-slurm: the job scripts it writes, and (marker ``slurm``) a real single-node Slurm running them.

The Slurm tests need the daemons that ``.ci/slurm.sh start`` brings up; they are skipped where ``sinfo``
is missing or no node answers. The node has 2 CPUs and the suite runs with ``pytest -n 2``: every job
here asks for one CPU, so the jobs queue behind each other at worst and never wait on this process.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bids_cl.cli import slurm
from bids_cl.errors import EXIT_MISSING_INPUT, EXIT_NO_DATA_SELECTED, EXIT_USAGE

WAIT_S = 600  # bound on any one Slurm test's wait for its jobs
STATUS_COLUMNS = ["participant_id", "task_id", "exit_code", "start", "end"]


def _bids(root: Path, labels: list[str], tsv: list[str] | None = None) -> Path:
    bids = root / "bids"
    for label in labels:
        (bids / f"sub-{label}" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    if tsv is not None:
        (bids / "participants.tsv").write_text(
            "participant_id\tage\n" + "".join(f"{x}\t30\n" for x in tsv))
    return bids


def _generate(tmp_path: Path, *args: str) -> int:
    return slurm.main([str(tmp_path / "bids"), str(tmp_path / "out"), "-o",
                       str(tmp_path / "jobs"), *args])


# ------------------------------------------------------------------------------------------------
# Generation (no Slurm needed)


def test_labels_from_participants_tsv_in_file_order(tmp_path: Path) -> None:
    bids = _bids(tmp_path, ["01", "02", "03"], tsv=["sub-03", "sub-01", "sub-07"])
    assert slurm.participant_labels(bids) == ["03", "01"]  # sub-07 has no folder: dropped


def test_labels_discovered_without_tsv(tmp_path: Path) -> None:
    bids = _bids(tmp_path, ["b", "a", "10"])
    (bids / "sub-notadir").write_text("")
    assert slurm.participant_labels(bids) == ["10", "a", "b"]
    assert slurm.participant_labels(bids, ["sub-a", "a"]) == ["a"]


def test_scripts_are_valid_bash_with_the_allocation(tmp_path: Path) -> None:
    _bids(tmp_path, ["01", "02"])
    assert _generate(tmp_path, "--no-container", "--cpus-per-task", "3", "--mem", "8G",
                     "--time", "1-00:00:00", "--partition", "short", "--account", "lab",
                     "--max-parallel", "5", "--extra-args", "--model demo --device cpu") == 0
    jobs = tmp_path / "jobs"
    assert (jobs / "participants.txt").read_text() == "01\n02\n"
    assert (jobs / "status.tsv").read_text() == "\t".join(STATUS_COLUMNS) + "\n"
    script = (jobs / "participant.sbatch").read_text()
    for directive in ("--array=1-2%5", "--cpus-per-task=3", "--mem=8G", "--time=1-00:00:00",
                      "--partition=short", "--account=lab"):
        assert f"#SBATCH {directive}\n" in script
    assert "--gres" not in script and "apptainer" not in script
    assert '--nprocs "$nprocs" --omp-nthreads "$omp_nthreads" --mem-mb "$mem_mb"' in script
    assert "--model demo --device cpu" in script
    assert "flock" in script
    group = (jobs / "group.sbatch").read_text()
    assert "#SBATCH --array" not in group and " group " in group
    assert "afterany" in (jobs / "submit.sh").read_text()
    for name in ("participant.sbatch", "group.sbatch", "submit.sh"):
        subprocess.run(["bash", "-n", str(jobs / name)], check=True)


def test_container_command(tmp_path: Path) -> None:
    _bids(tmp_path, ["01"])
    image = tmp_path / "bids_cl.sif"
    image.write_text("")
    (tmp_path / "tf").mkdir()
    assert _generate(tmp_path, "--image", str(image), "--gpus", "1", "--templateflow-home",
                     str(tmp_path / "tf"), "--network-none", "--work-root", "/scratch/$USER",
                     "--prologue", "module load apptainer") == 0
    script = (tmp_path / "jobs" / "participant.sbatch").read_text()
    assert "#SBATCH --gres=gpu:1\n" in script
    assert "run --cleanenv --home" in script and "--nv" in script
    assert f"-B {tmp_path}/bids:{tmp_path}/bids:ro" in script
    assert "/templateflow:ro --env TEMPLATEFLOW_HOME=/templateflow" in script
    assert "--net --network none" in script
    assert 'work_root="/scratch/$USER"' in script
    assert script.index("module load apptainer") < script.index("cmd=(")
    group = (tmp_path / "jobs" / "group.sbatch").read_text()
    assert "--nv" not in group and "--gres" not in group


def test_rerun_failed_takes_the_latest_status(tmp_path: Path) -> None:
    _bids(tmp_path, ["01", "02", "03", "04"])
    assert _generate(tmp_path, "--no-container") == 0
    with open(tmp_path / "jobs" / "status.tsv", "a") as status:
        status.write("sub-01\t5_1\t1\ta\tb\nsub-02\t5_2\t0\ta\tb\nsub-03\t5_3\t65\ta\tb\n"
                     "group\t6\t0\ta\tb\nsub-01\t7_1\t0\ta\tb\n")
    assert _generate(tmp_path, "--no-container", "--rerun-failed") == 0
    # 01 failed then succeeded; 03 failed; 04 never reported.
    assert (tmp_path / "jobs" / "participants.txt").read_text().split() == ["03", "04"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ([], EXIT_USAGE),  # neither --image nor --no-container
        (["--no-container", "--time", "4h"], EXIT_USAGE),
        (["--no-container", "--mem", "lots"], EXIT_USAGE),
        (["--no-container", "--partition", "a b"], EXIT_USAGE),
        (["--no-container", "--work-root", '/tmp/"x'], EXIT_USAGE),
        (["--no-container", "--participant-label", "0-1"], EXIT_USAGE),
        (["--no-container", "--participant-label", "09"], EXIT_NO_DATA_SELECTED),
        (["--image", "missing.sif"], EXIT_MISSING_INPUT),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], code: int,
                     capsys: pytest.CaptureFixture[str]) -> None:
    _bids(tmp_path, ["01"])
    assert _generate(tmp_path, *args) == code
    assert "bids_cl-slurm: error:" in capsys.readouterr().err


def test_submit_without_sbatch_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _bids(tmp_path, ["01"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert _generate(tmp_path, "--no-container", "--submit") == 1
    assert "sbatch is not on PATH" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# A real Slurm


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                              timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return False
    states = proc.stdout.split()
    return proc.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated",
                                                            "completing") for s in states)


needs_slurm = pytest.mark.skipif(not _slurm_up(), reason="no responding Slurm node "
                                 "(bash .ci/slurm.sh start)")


def _active(job_ids: list[str]) -> bool:
    """True while any of the jobs is pending, running or completing."""
    proc = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
                          capture_output=True, text=True, check=False)
    # An id Slurm has already forgotten makes squeue fail with "Invalid job id": that job is over.
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _status_rows(status: Path) -> list[dict[str, str]]:
    lines = status.read_text().splitlines()
    assert lines[0].split("\t") == STATUS_COLUMNS
    return [dict(zip(STATUS_COLUMNS, line.split("\t"), strict=True)) for line in lines[1:]]


def _submit_and_wait(tmp_path: Path, args: list[str], wait_s: int = WAIT_S) -> list[dict[str, str]]:
    """Generate with --submit, wait (bounded) for both jobs, cancel leftovers; the status rows."""
    assert _generate(tmp_path, *args, "--submit") == 0
    ids = json.loads((tmp_path / "jobs" / "submitted.json").read_text())
    job_ids = [ids["array_job_id"], ids["group_job_id"]]
    deadline = time.monotonic() + wait_s
    try:
        while _active(job_ids) and time.monotonic() < deadline:
            time.sleep(2)
        finished = not _active(job_ids)
    finally:
        subprocess.run(["scancel", *job_ids], capture_output=True, check=False)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "jobs" / "logs").glob("*")))
    assert finished, f"the jobs did not end within {wait_s}s; logs:\n{logs}"
    rows = _status_rows(tmp_path / "jobs" / "status.tsv")
    assert any(r["participant_id"] == "group" for r in rows), logs
    return rows


_FAKE_BIDS_CL = '''
import pathlib, sys
bids, out, level, *rest = sys.argv[1:]
out = pathlib.Path(out)
out.mkdir(parents=True, exist_ok=True)
if level == "participant":
    label = rest[rest.index("--participant-label") + 1]
    work = pathlib.Path(rest[rest.index("-w") + 1])
    work.mkdir(parents=True)
    (out / f"sub-{label}").mkdir(exist_ok=True)
    (out / f"sub-{label}" / "args.txt").write_text(" ".join(rest))
    sys.exit(65 if label == "03" else 0)
done = sorted(p.name for p in out.glob("sub-*") if p.is_dir())
(out / "group_lesions.tsv").write_text("participant_id\\n" + "".join(d + "\\n" for d in done))
'''


@pytest.mark.slurm
@needs_slurm
def test_array_and_group_mechanics(tmp_path: Path) -> None:
    """The array runs each participant with the allocation, records every exit code (a failed
    participant too), then the group job runs after the array (afterany) and is recorded."""
    _bids(tmp_path, ["01", "02", "03"])
    fake = tmp_path / "fake_bids_cl.py"
    fake.write_text(_FAKE_BIDS_CL)
    scratch = tmp_path / "scratch"
    rows = _submit_and_wait(tmp_path, [
        "--bids-cl-cmd", f"{sys.executable} {fake}", "--cpus-per-task", "1", "--mem", "1G",
        "--time", "00:05:00", "--group-mem", "1G", "--work-root", str(scratch)], wait_s=300)

    codes = {r["participant_id"]: r["exit_code"] for r in rows}
    assert codes == {"sub-01": "0", "sub-02": "0", "sub-03": "65", "group": "0"}
    ids = json.loads((tmp_path / "jobs" / "submitted.json").read_text())
    tasks = sorted(r["task_id"] for r in rows if r["participant_id"] != "group")
    assert tasks == [f"{ids['array_job_id']}_{i}" for i in (1, 2, 3)]
    args = (tmp_path / "out" / "sub-01" / "args.txt").read_text().split()
    assert args[args.index("--nprocs") + 1] == "1"
    assert args[args.index("--omp-nthreads") + 1] == "1"
    assert 256 <= int(args[args.index("--mem-mb") + 1]) < 1024  # below the 1G allocation
    assert args[args.index("-w") + 1].startswith(str(scratch))
    assert list(scratch.iterdir()) == []  # node-local work folders removed at the end
    group = (tmp_path / "out" / "group_lesions.tsv").read_text().split()
    assert group == ["participant_id", "sub-01", "sub-02", "sub-03"]
    group_log = next((tmp_path / "jobs" / "logs").glob("*group*"))
    assert "3 participant task(s) ended, 1 failed" in group_log.read_text()


_FAKE_APPTAINER = '''#!/bin/sh
# Records how it was called and exits like bids_cl would; no container involved.
out="$1"; shift
printf '%s\\n' "$@" >>"$out/apptainer-$$.args"
'''


@pytest.mark.slurm
@needs_slurm
def test_container_command_on_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--image mode as a node runs it: the runtime found on PATH, called with the binds, a
    per-task HOME, --nv for GPU tasks only, the image, then bids_cl's arguments."""
    _bids(tmp_path, ["01"])
    image = tmp_path / "bids_cl.sif"
    image.write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apptainer"
    out = tmp_path / "out"  # must not exist yet: the job creates it before binding it
    fake.write_text(_FAKE_APPTAINER.replace('out="$1"; shift', f"out={out}"))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    rows = _submit_and_wait(tmp_path, [
        "--image", str(image), "--cpus-per-task", "1", "--mem", "1G", "--group-mem", "1G",
        "--time", "00:05:00", "--work-root", str(tmp_path / "scratch")], wait_s=300)
    assert {r["participant_id"]: r["exit_code"] for r in rows} == {"sub-01": "0", "group": "0"}
    calls = [p.read_text().splitlines() for p in sorted(out.glob("apptainer-*.args"))]
    assert len(calls) == 2
    participant = next(c for c in calls if "participant" in c)
    assert participant[:3] == ["run", "--cleanenv", "--home"]
    assert participant[3].startswith(str(tmp_path / "scratch")) and participant[3].endswith("/home")
    assert f"{tmp_path}/bids:{tmp_path}/bids:ro" in participant
    assert f"{out}:{out}" in participant
    assert "--nv" not in participant  # a CPU task
    after_image = participant[participant.index(str(image)) + 1:]
    assert after_image[:5] == [str(tmp_path / "bids"), str(out), "participant",
                               "--participant-label", "01"]


def _pipeline_ready() -> str | None:
    """Why the end-to-end test cannot run yet (parts still being written), or None."""
    parts = [("bids_cl.synth.cli", "main"), ("bids_cl.cli.workflow", "run_participants"),
             ("bids_cl.group", "run_group_level")]
    for module, name in parts:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            return f"pipeline part missing: {module}.{name} ({exc})"
    return None


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_real_participants_on_slurm(tmp_path: Path) -> None:
    """bids_cl itself, CPU and the demo model, two phantom participants as an array, then group."""
    missing = _pipeline_ready()
    if missing:
        pytest.skip(missing)
    from bids_cl.synth.cli import main as synth

    assert synth([str(tmp_path / "bids"), "--participants", "2", "--size", "tiny",
                  "--seed", "1"]) == 0
    rows = _submit_and_wait(tmp_path, [
        "--no-container", "--cpus-per-task", "1", "--mem", "4G", "--time", "00:30:00",
        "--group-mem", "2G", "--work-root", str(tmp_path / "scratch"),
        "--extra-args", "--model demo --device cpu --output-spaces native"])

    participants = slurm.participant_labels(tmp_path / "bids")
    assert len(participants) >= 2
    codes = {r["participant_id"]: r["exit_code"] for r in rows}
    assert codes == {**{f"sub-{x}": "0" for x in participants}, "group": "0"}, codes
    out = tmp_path / "out"
    for label in participants:
        masks = list((out / f"sub-{label}").rglob(f"sub-{label}*_label-CL_mask.nii.gz"))
        assert masks, f"no lesion mask for sub-{label}"
        assert list((out / f"sub-{label}").rglob("*_label-CL_desc-lesions_stats.tsv"))
    assert list(out.rglob("group_lesions.tsv")), "the group level wrote no group_lesions.tsv"


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_nipype_slurm_plugin_runs_each_node_as_a_job(tmp_path: Path) -> None:
    """--use-plugin with the packaged plugin file's SLURM plugin, from a shell without LOGNAME (Nipype's
    cluster plugins need it): every node is a Slurm job, bids_cl waits and reports like a local run."""
    import os

    import yaml
    from conftest import run_cli

    from bids_cl.synth.cli import main as synth

    assert synth([str(tmp_path / "bids"), "--participants", "1", "--size", "tiny", "--seed", "1",
                  "--lesion-free-fraction", "0"]) == 0
    packaged = yaml.safe_load((Path(slurm.__file__).parents[1] / "data" / "slurm_plugin.yml").read_text())
    assert packaged["plugin"] == "SLURM"
    plugin = tmp_path / "plugin.yml"
    plugin.write_text(yaml.safe_dump({"plugin": "SLURM", "plugin_args": {
        "sbatch_args": "--time=00:20:00 --mem=2G --cpus-per-task=1", "poll_sleep_duration": 1}}))
    env = {k: v for k, v in os.environ.items() if k != "LOGNAME"}
    proc = run_cli(tmp_path / "bids", tmp_path / "out", "participant", "-w", tmp_path / "work",
                   "--use-plugin", plugin, "--model", "demo", "--device", "cpu",
                   "--output-spaces", "native", "--nprocs", "1", env=env, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cortical lesion(s)" in proc.stdout
    batch = tmp_path / "work" / "bids_cl_wf" / "batch"
    submitted = " ".join(p.name for p in batch.glob("batchscript_*.sh"))
    assert "_skullstrip.sh" in submitted and "_segment.sh" in submitted, submitted
    summary = next((tmp_path / "out").rglob("*_label-CL_desc-summary_stats.json"))
    assert json.loads(summary.read_text())["LesionCount"] >= 0
    assert (tmp_path / "out" / "sub-01.html").is_file()
