"""The real command line, in a subprocess: parsing, dry runs and every exit code."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import run_cli, write_bids

from bids_cl import __version__
from bids_cl.cli.parser import parse_args
from bids_cl.config import RunConfig
from bids_cl.errors import BidsClError
from bids_cl.utils.bids import find_bids_validator


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_version_and_help() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert __version__ in proc.stdout
    proc = run_cli("--help")
    assert proc.returncode == 0
    for option in ("--participant-label", "--bids-filter-file", "--skull-strip", "--dry-run",
                   "--connectivity", "--min-lesion-size", "--output-spaces", "--use-plugin"):
        assert option in proc.stdout


def test_dry_run_prints_plan_and_writes_nothing(mp2rage_dataset: Path, tmp_path: Path) -> None:
    before = _snapshot(mp2rage_dataset)
    out = tmp_path / "out"
    proc = run_cli(mp2rage_dataset, out, "participant", "--dry-run", "--skip-bids-validation",
                   "--participant-label", "sub-01", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    plan = json.loads(line)
    assert plan["participant"] == "01"
    assert plan["sequence"] == "MP2RAGE"
    assert plan["inv2"].endswith("_inv-2_part-mag_MP2RAGE.nii.gz")
    assert plan["evidence"]
    assert not out.exists()
    assert not (tmp_path / "work").exists()
    assert _snapshot(mp2rage_dataset) == before


def test_exit_64_usage(mp2rage_dataset: Path, tmp_path: Path) -> None:
    proc = run_cli(mp2rage_dataset, tmp_path / "out", "participant", "--connectivity", "5")
    assert proc.returncode == 64
    assert proc.stderr.strip().startswith("bids_cl: error:")
    assert "Traceback" not in proc.stderr
    proc = run_cli(mp2rage_dataset, mp2rage_dataset / "out", "participant", "--dry-run")
    assert proc.returncode == 64  # output inside the input dataset


def test_exit_17_unknown_level(mp2rage_dataset: Path, tmp_path: Path) -> None:
    proc = run_cli(mp2rage_dataset, tmp_path / "out", "session")
    assert proc.returncode == 17
    assert "unknown analysis level" in proc.stderr


def test_exit_16_validation(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    (root / "dataset_description.json").unlink()
    proc = run_cli(root, tmp_path / "out", "participant", "--dry-run")
    assert proc.returncode == 16
    assert "dataset_description.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(find_bids_validator() is None,
                    reason="the full BIDS validator is not installed")
def test_exit_16_full_validator(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    (root / "sub-01" / "anat" / "sub-01_notasuffix.nii.gz").write_bytes(b"x")
    proc = run_cli(root, tmp_path / "out", "participant", "--dry-run")
    assert proc.returncode == 16, proc.stderr
    # The validator's whole report went to stderr before the error; it belongs in the log.
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_cli(root, tmp_path / "out", "participant", "--dry-run", "--skip_bids_validation")
    assert proc.returncode == 0, proc.stderr


def test_exit_18_labels_and_filters(mp2rage_dataset: Path, tmp_path: Path) -> None:
    proc = run_cli(mp2rage_dataset, tmp_path / "out", "participant", "--dry-run",
                   "--skip-bids-validation", "--participant_label", "07")
    assert proc.returncode == 18
    assert "sub-07" in proc.stderr
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"uni": {"acquisition": "nope"}, "t1w": {"run": 9}}))
    proc = run_cli(mp2rage_dataset, tmp_path / "out", "participant", "--dry-run",
                   "--skip-bids-validation", "--bids-filter-file", filters)
    assert proc.returncode == 18
    proc = run_cli(mp2rage_dataset, tmp_path / "out", "participant", "--dry-run",
                   "--skip-bids-validation", "--session-label", "ses-09")
    assert proc.returncode == 18


def test_exit_65_empty_image(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": {"__empty__": True}})
    proc = run_cli(root, tmp_path / "out", "participant", "--skip-bids-validation",
                   "-w", tmp_path / "work", cwd=tmp_path)
    assert proc.returncode == 65, proc.stderr
    assert "0-byte" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_exit_65_four_d_image(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    from conftest import write_nifti

    write_nifti(root / "sub-01/anat/sub-01_T1w.nii.gz", shape=(8, 8, 8, 3))
    proc = run_cli(root, tmp_path / "out", "participant", "--skip-bids-validation",
                   "-w", tmp_path / "work")
    assert proc.returncode == 65
    assert "4-D" in proc.stderr


def test_exit_66_no_t1_weighted_image(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_FLAIR.nii.gz": None})
    proc = run_cli(root, tmp_path / "out", "participant", "--skip-bids-validation", "--dry-run")
    assert proc.returncode == 66
    assert "no T1-weighted image" in proc.stderr


def test_exit_73_cannot_create_output(mp2rage_dataset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_cli(mp2rage_dataset, blocker / "out", "participant", "--skip-bids-validation",
                   "-w", tmp_path / "work")
    assert proc.returncode == 73, proc.stderr
    assert "cannot create the output directory" in proc.stderr


def test_parse_args_fills_config(mp2rage_dataset: Path, tmp_path: Path) -> None:
    config = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                         "--participant-label", "sub-01", "02", "--folds", "0", "1",
                         "--min-lesion-size", "3uL", "--connectivity", "18",
                         "--output-spaces", "native", "--nprocs", "2", "--omp-nthreads", "1",
                         "--device", "cpu", "--disable-tta"])
    assert config.participant_label == ["01", "02"]
    assert config.folds == [0, 1]
    assert config.min_lesion_size == "3uL"
    assert config.connectivity == 18
    assert config.output_spaces == []
    assert (config.nprocs, config.omp_nthreads) == (2, 1)
    saved = config.save(tmp_path / "bids_cl.toml")
    again = RunConfig.load(saved)
    assert again.to_dict() == config.to_dict()


def test_config_file_reloads_and_cli_overrides(mp2rage_dataset: Path, tmp_path: Path) -> None:
    first = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                        "--threshold", "0.3", "--connectivity", "6"])
    path = first.save(tmp_path / "run.toml")
    second = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                         "--config-file", str(path), "--connectivity", "26"])
    assert second.threshold == 0.3
    assert second.connectivity == 26


def test_plugin_file(mp2rage_dataset: Path, tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\nplugin_args: {}\n")
    config = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                         "--use-plugin", str(plugin)])
    assert config.plugin == "Linear"
    plugin.write_text("plugin_args: {}\n")
    with pytest.raises(BidsClError) as err:
        parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                    "--use-plugin", str(plugin)])
    assert err.value.code == 64


def test_graph_plugins_are_refused(mp2rage_dataset: Path, tmp_path: Path) -> None:
    """SLURMGraph & co. return before any job ran: bids_cl would report every target as failed."""
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: SLURMGraph\nplugin_args: {sbatch_args: --mem=2G}\n")
    with pytest.raises(BidsClError) as err:
        parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin)])
    assert err.value.code == 64 and "use plugin: SLURM " in err.value.message
    plugin.write_text("plugin: SLURM\nplugin_args: {sbatch_args: --mem=2G}\n")
    config = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                         "--use-plugin", str(plugin)])
    assert (config.plugin, config.plugin_args) == ("SLURM", {"sbatch_args": "--mem=2G"})
    plugin.write_text("plugin: SLURM\nplugin_args: {poll_sleep_duration: soon}\n")
    with pytest.raises(BidsClError) as err:
        parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin)])
    assert err.value.code == 64 and "poll_sleep_duration" in err.value.message


def test_shared_segment_worker_needs_a_local_plugin(mp2rage_dataset: Path, tmp_path: Path) -> None:
    """A shared worker lives on the runner's machine: with SLURM the nodes would not reach it."""
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: SLURM\nplugin_args: {sbatch_args: --mem=2G}\n")
    args = [str(mp2rage_dataset), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin)]
    with pytest.raises(BidsClError) as err:
        parse_args([*args, "--segment-worker", "shared"])
    assert err.value.code == 64 and "--segment-worker node" in err.value.message
    assert parse_args([*args, "--segment-worker", "node"]).segment_worker == "node"
    assert parse_args(args).segment_worker == "auto"
    local = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                        "--segment-worker", "shared"])
    assert local.segment_worker == "shared"


def test_unknown_plugin_is_a_usage_error_before_any_work(tmp_path: Path) -> None:
    """A Nipype plugin that does not exist was exit 1 after preflight; it is a bad option (64), one line."""
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: NoSuchPlugin\nplugin_args: {}\n")
    proc = run_cli(root, tmp_path / "out", "participant", "--skip-bids-validation", "--model",
                   "demo", "--output-spaces", "native", "--use-plugin", plugin,
                   "-w", tmp_path / "work")
    assert proc.returncode == 64, proc.stderr
    assert "no plugin named 'NoSuchPlugin'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("spelling", [["-w", "{new}"], ["--work-dir", "{new}"], ["--work-dir={new}"]])
def test_config_file_never_beats_the_command_line_work_dir(mp2rage_dataset: Path, tmp_path: Path,
                                                            spelling: list[str]) -> None:
    saved = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                        "-w", str(tmp_path / "old_work")]).save(tmp_path / "run.toml")
    new = tmp_path / "new_work"
    config = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                         "--config-file", str(saved), *[a.format(new=new) for a in spelling]])
    assert config.work_dir == new  # the old code ran in old_work: '-w' is not the field name


def test_config_file_never_beats_any_spelling(mp2rage_dataset: Path, tmp_path: Path) -> None:
    """Every alias of an option wins over the file: --nthreads, --mem, --nipype-plugin-file, -v."""
    plugin_old, plugin_new = tmp_path / "old.yml", tmp_path / "new.yml"
    plugin_old.write_text("plugin: MultiProc\nplugin_args: {n_procs: 1}\n")
    plugin_new.write_text("plugin: Linear\nplugin_args: {}\n")
    first = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant", "--nprocs", "1",
                        "--mem-mb", "64000", "--use-plugin", str(plugin_old), "--threshold", "0.3"])
    saved = first.save(tmp_path / "run.toml")
    second = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                         "--config-file", str(saved), "--nthreads", "2", "--mem", "4000",
                         "--nipype-plugin-file", str(plugin_new), "-vv"])
    assert (second.nprocs, second.mem_mb, second.verbose) == (2, 4000, 2)
    assert (second.use_plugin, second.plugin, second.plugin_args) == (plugin_new, "Linear", {})
    assert second.threshold == 0.3  # what the command line did not give still comes from the file


def test_saved_config_keeps_the_requested_device(mp2rage_dataset: Path, tmp_path: Path) -> None:
    """A run on a CPU node saved device = "cpu", so its config pinned the CPU on a GPU node."""
    from bids_cl.config import ResolvedRun

    config = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant"])
    resolved = ResolvedRun(device="cpu", nprocs=2, omp_nthreads=1, mem_mb=4000, model="demo",
                           random_seed=config.random_seed)
    saved = config.save(tmp_path / "bids_cl.toml", resolved)
    text = saved.read_text()
    assert '[resolved]\ndevice = "cpu"' in text
    assert RunConfig.load(saved).device == "auto" and RunConfig.load(saved).nprocs is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.device = "cpu"  # type: ignore[misc]
    again = parse_args([str(mp2rage_dataset), str(tmp_path / "out"), "participant",
                        "--config-file", str(saved)])
    assert again.device == "auto"


def test_invalid_config_file_is_a_usage_error(mp2rage_dataset: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[bids_cl\nthreshold = ")
    proc = run_cli(mp2rage_dataset, tmp_path / "out", "participant", "--config-file", bad)
    assert proc.returncode == 64 and "not valid TOML" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_symlink_loop_is_named_not_followed(tmp_path: Path) -> None:
    """pybids followed a link to an ancestor ~40 levels and ended in 'Duplicate node name' (exit 1)."""
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    (root / "sub-01" / "anat" / "loop").symlink_to(root / "sub-01")
    proc = run_cli(root, tmp_path / "out", "participant", "--dry-run", "--skip-bids-validation")
    assert proc.returncode == 16, proc.stderr
    assert "sub-01/anat/loop" in proc.stderr and "loop" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_refused_runs_leave_nothing_behind(tmp_path: Path) -> None:
    """A fold the model lacks is refused before any skull stripping, with no output folder, and no
    command leaves a /tmp/bids_cl-*.log behind unless its error points at it."""
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}
    proc = run_cli(root, tmp_path / "out", "participant", "--skip-bids-validation", "--model", "demo",
                   "--folds", "7", "--output-spaces", "native", "-w", tmp_path / "work", env=env)
    assert proc.returncode == 64, proc.stderr
    assert "no fold" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    for argv in (["--help"], ["--version"], [str(root), str(tmp_path / "o"), "nonsense"]):
        run_cli(*argv, env=env)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("bids_cl")] == []


def test_concurrent_run_on_the_same_work_folder_is_refused(tmp_path: Path) -> None:
    import fcntl

    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    work = tmp_path / "work"
    work.mkdir()
    with open(work / ".bids_cl-lock-sub-01", "a+") as held:  # another run of sub-01 holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_cli(root, tmp_path / "out", "participant", "--skip-bids-validation", "--model",
                       "demo", "--output-spaces", "native", "-w", work)
    assert proc.returncode == 73, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "in use for sub-01" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_malformed_plugin_yaml_is_one_line(mp2rage_dataset: Path, tmp_path: Path) -> None:
    """PyYAML's error spans 8 lines (marks, carets); the user gets one, with the line number."""
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args: {n_procs: 2\n  bad: [\n")
    proc = run_cli(mp2rage_dataset, tmp_path / "out", "participant", "--use-plugin", plugin,
                   "--dry-run", "--skip-bids-validation")
    assert proc.returncode == 64, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "not valid YAML at line" in proc.stderr
