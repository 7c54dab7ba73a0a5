"""The derivatives writer: names, sidecars, atomicity and determinism (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_cl.config import ResolvedRun, RunConfig
from bids_cl.derivatives import spec
from bids_cl.derivatives import writer as outputs
from bids_cl.derivatives.records import SegmentationRecord, SkullStripRecord
from bids_cl.utils.bids import WorkItem
from bids_cl.utils.io import atomic_write
from bids_cl.workflows.base import collect_methods, init_bids_cl_wf

SKULLSTRIP = SkullStripRecord(strategy="inv2", detail="deepbet on INV2", warnings=["w"], used_inv2=True)
SEGMENTATION = SegmentationRecord(
    threshold=0.5, threshold_source="default", connectivity=26, min_lesion_size=None,
    min_lesion_size_source="default", min_lesion_size_voxels=None, folds=[0], tta=False, device="cpu",
    fast_path=True, threads=1, precision="fp32", orientation={"input": "RAS", "model": "RAS"},
    tiles_run=1, tiles_total=1, ood_warning=None, warnings=["phantoms"],
    provenance={"name": "demo", "warning": "phantoms"}, timings={"predict": 1.0})


def _item(tmp_path: Path) -> WorkItem:
    target = tmp_path / "bids" / "sub-01" / "ses-02" / "anat" / "sub-01_ses-02_UNIT1.nii.gz"
    target.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(target))
    return WorkItem(participant="01", session="02", target=str(target), target_suffix="UNIT1",
                    entities={"subject": "01", "session": "02"}, prefix="sub-01_ses-02",
                    sequence="MP2RAGE", evidence=["suffix UNIT1"], field_strength=7.0)


def _inputs(tmp_path: Path) -> dict[str, str]:
    work = tmp_path / "node"
    work.mkdir()
    affine = np.diag([0.75, 0.75, 0.75, 1.0])
    brain = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    lesion = np.zeros((8, 8, 8), np.uint8)
    lesion[2:4, 2:4, 2:4] = 1
    files = {}
    for name, data in {"brain": brain, "mask": (brain > 0.1).astype(np.uint8),
                       "prob": lesion.astype(np.float32) * 0.9, "lesion": lesion}.items():
        files[name] = str(work / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), files[name])
    table = pd.DataFrame({"lesion_id": [1], "voxels": [8], "volume_ul": [8 * 0.421875],
                          "mean_prob": [0.9], "max_prob": [0.9], "uncertainty": [0.0]})
    files["tsv"] = str(work / "lesions.tsv")
    table.to_csv(files["tsv"], sep="\t", index=False)
    return files


def test_write_target_derivatives_names_and_sidecars(tmp_path: Path) -> None:
    item = _item(tmp_path)
    files = _inputs(tmp_path)
    out = tmp_path / "out"
    outputs.write_dataset_description(out, tmp_path / "bids", {"name": "demo"})
    written = outputs.write_target_derivatives(
        out, tmp_path / "bids", item, brain=files["brain"], brain_mask=files["mask"],
        skullstrip=SKULLSTRIP, probseg=files["prob"], lesion_mask=files["lesion"],
        lesions_tsv=files["tsv"], segmentation=SEGMENTATION,
    )
    anat = out / "sub-01" / "ses-02" / "anat"
    names = sorted(p.name for p in anat.iterdir())
    assert names == sorted([
        "sub-01_ses-02_desc-brain_mask.nii.gz", "sub-01_ses-02_desc-brain_mask.json",
        "sub-01_ses-02_desc-preproc_T1w.nii.gz", "sub-01_ses-02_desc-preproc_T1w.json",
        "sub-01_ses-02_label-CL_probseg.nii.gz", "sub-01_ses-02_label-CL_probseg.json",
        "sub-01_ses-02_label-CL_mask.nii.gz", "sub-01_ses-02_label-CL_mask.json",
        "sub-01_ses-02_label-CL_desc-lesions_stats.tsv",
        "sub-01_ses-02_label-CL_desc-lesions_stats.json",
        "sub-01_ses-02_label-CL_desc-summary_stats.json",
    ])
    assert written[-1].name.endswith("summary_stats.json")
    mask_meta = json.loads((anat / "sub-01_ses-02_label-CL_mask.json").read_text())
    assert mask_meta["Type"] == "Lesion"
    assert mask_meta["Sources"][0] == "bids:raw:sub-01/ses-02/anat/sub-01_ses-02_UNIT1.nii.gz"
    assert json.loads((anat / "sub-01_ses-02_desc-preproc_T1w.json").read_text())["SkullStripped"]
    summary = json.loads((anat / "sub-01_ses-02_label-CL_desc-summary_stats.json").read_text())
    assert summary["LesionCount"] == 1
    assert summary["FieldStrength"] == 7.0
    assert summary["Sequence"] == "MP2RAGE"
    # The summary has exactly the contract's keys, in its order; timings stay out of derivatives.
    assert list(summary) == list(spec.SUMMARY_FIELDS)
    assert summary["Warnings"] == ["w", "phantoms"] and summary["Threshold"] == 0.5
    mask = nib.load(anat / "sub-01_ses-02_label-CL_mask.nii.gz")
    assert mask.get_data_dtype() == np.uint8
    assert np.allclose(mask.affine, np.diag([0.75, 0.75, 0.75, 1.0]))
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids_cl"
    # Deterministic: writing again gives the same bytes (gzip without a timestamp).
    before = {p.name: p.read_bytes() for p in anat.iterdir()}
    outputs.write_target_derivatives(
        out, tmp_path / "bids", item, brain=files["brain"], brain_mask=files["mask"],
        skullstrip=SKULLSTRIP, probseg=files["prob"], lesion_mask=files["lesion"],
        lesions_tsv=files["tsv"], segmentation=SEGMENTATION,
    )
    assert {p.name: p.read_bytes() for p in anat.iterdir()} == before


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    target.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt  # as if the run were killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_workflow_graph_has_a_branch_per_session_and_target(tmp_path: Path) -> None:
    item = _item(tmp_path)
    second = WorkItem.from_dict({**item.to_dict(), "session": "03", "prefix": "sub-01_ses-03"})
    config = RunConfig(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                       work_dir=tmp_path / "work", model="demo")
    resolved = ResolvedRun(device="cpu", nprocs=1, omp_nthreads=1, mem_mb=None, model="demo",
                           random_seed=config.random_seed)
    workflow = init_bids_cl_wf(config=config, resolved=resolved, items=[item, second])
    names = {node.name for node in workflow._graph.nodes()}  # noqa: SLF001 - nipype internals
    assert names == {"single_subject_01_wf"}
    flat = {n.fullname for n in workflow._get_all_nodes()}  # noqa: SLF001
    assert any("target_sub_01_ses_02_wf.segment" in n for n in flat)
    assert any("target_sub_01_ses_03_wf.segment" in n for n in flat)
    assert any("template_wf.register" in n for n in flat)
    # Every node writes Nipype's crash files into this run's log (not the current directory), and
    # records its target's outcome there; the record path is not part of Nipype's hash.
    crash_dir = str(spec.log_dir(config.output_dir, "01", config.run_uuid) / spec.NIPYPE_CRASH_DIR)
    for node in workflow._get_all_nodes():  # noqa: SLF001
        assert node.config["execution"]["crashdump_dir"] == crash_dir, node.fullname
    segment = next(n for n in workflow._get_all_nodes() if n.fullname.endswith("ses_02_wf.segment"))  # noqa: SLF001
    assert segment.inputs.record_file.endswith("/targets/sub-01_ses-02.json")
    assert "record_file" not in dict(segment.inputs.get_hashval()[0])
    assert segment.inputs.model_verified is True  # verified once by the runner, not in every node
    # The methods text: every workflow's paragraph once, outermost first.
    methods = collect_methods(workflow)
    assert methods[0].startswith("Cortical lesions were segmented with bids_cl")
    # ... the lesion change between the two sessions included (docs/longitudinal.md)
    assert any("change_sub_01_ses_03_desc_changeFrom02_wf.align" in n for n in flat)
    assert any(m.startswith("Lesion change between sessions") for m in methods)
    assert any("antspyx" in m for m in methods) and len(methods) == len(set(methods)) == 5


def test_gpu_graph_keeps_cpu_slots_free_beside_the_segmentation(tmp_path: Path) -> None:
    """On a GPU run the segment node is a GPU node holding GPU_NODE_CPUS CPU slots (it was all of them:
    MultiProc could then run nothing beside it), and another participant's registration fits next to it."""
    from bids_cl.utils.resources import GPU_NODE_CPUS

    item = _item(tmp_path)
    config = RunConfig(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                       work_dir=tmp_path / "work", model="demo")
    nprocs, omp = 16, 16 - GPU_NODE_CPUS  # what effective_cpus resolves for 16 CPUs and a GPU
    resolved = ResolvedRun(device="cuda", nprocs=nprocs, omp_nthreads=omp, mem_mb=None, model="demo",
                           random_seed=config.random_seed)
    nodes = {n.fullname.rsplit(".", 1)[-1]: n
             for n in init_bids_cl_wf(config=config, resolved=resolved, items=[item])._get_all_nodes()}  # noqa: SLF001
    segment, register = nodes["segment"], nodes["register"]
    assert segment.is_gpu_node() and not register.is_gpu_node()
    assert segment.n_procs == segment.inputs.nthreads == GPU_NODE_CPUS
    assert nodes["skullstrip"].n_procs == register.n_procs == omp
    assert segment.n_procs + register.n_procs <= nprocs
    cpu = ResolvedRun(device="cpu", nprocs=16, omp_nthreads=16, mem_mb=None, model="demo",
                      random_seed=config.random_seed)
    cpu_nodes = {n.fullname.rsplit(".", 1)[-1]: n
                 for n in init_bids_cl_wf(config=config, resolved=cpu, items=[item])._get_all_nodes()}  # noqa: SLF001
    assert cpu_nodes["segment"].n_procs == 16 and not cpu_nodes["segment"].is_gpu_node()


def test_shared_segment_worker_graph_and_scheduling(tmp_path: Path) -> None:
    """--segment-worker: auto shares one worker on a GPU with a local plugin only; with it, each segment
    node waits in one of WORKER_DEPTH GPU slots holding its share of the worker's CPUs and memory, and
    knows the worker's address (not hashed: the cache survives a change of mode)."""
    import dataclasses

    from bids_cl.cli.workflow import plugin_settings, segment_worker_mode
    from bids_cl.engine.worker import WORKER_DEPTH
    from bids_cl.workflows.base import SEGMENT_MEM_GB

    item = _item(tmp_path)
    config = RunConfig(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out",
                       work_dir=tmp_path / "work", model="demo")
    slurm = dataclasses.replace(config, plugin="SLURM")
    assert segment_worker_mode(config, "cuda") == "shared"
    assert segment_worker_mode(config, "cpu") == "node"
    assert segment_worker_mode(slurm, "cuda") == "node"  # its jobs run on other machines
    assert segment_worker_mode(dataclasses.replace(config, segment_worker="shared"), "cpu") == "shared"
    assert segment_worker_mode(dataclasses.replace(config, segment_worker="node"), "cuda") == "node"

    def segment_node(resolved: ResolvedRun):
        return next(n for n in init_bids_cl_wf(config=config, resolved=resolved, items=[item])
                    ._get_all_nodes() if n.fullname.endswith(".segment"))  # noqa: SLF001

    base = ResolvedRun(device="cuda", nprocs=16, omp_nthreads=14, mem_mb=None, model="demo",
                       random_seed=config.random_seed)
    shared = dataclasses.replace(base, segment_worker="shared", worker_address="/tmp/x/segment.sock")
    node, waiting = segment_node(base), segment_node(shared)
    assert node.n_procs == 2 and node.mem_gb == SEGMENT_MEM_GB and not node.inputs.worker
    assert waiting.is_gpu_node() and waiting.inputs.worker == "/tmp/x/segment.sock"
    assert waiting.n_procs == 1 and waiting.mem_gb == SEGMENT_MEM_GB / WORKER_DEPTH
    assert waiting.inputs.nthreads == node.inputs.nthreads  # the same engine settings either way
    assert dict(waiting.inputs.get_hashval()[0]) == dict(node.inputs.get_hashval()[0])
    assert plugin_settings(config, shared)[1]["n_gpu_procs"] == WORKER_DEPTH
    assert plugin_settings(config, base)[1]["n_gpu_procs"] == 1
    # on a CPU run a shared worker segments one image at a time, with the node's threads
    cpu = dataclasses.replace(shared, device="cpu", omp_nthreads=16)
    assert segment_node(cpu).n_procs == 16 and segment_node(cpu).is_gpu_node()
    assert plugin_settings(config, cpu)[1]["n_gpu_procs"] == 1
    # ... and its cache is the node mode's (use_gpu, a scheduling hint, was hashed: a rerun in the other
    # mode segmented every image again)
    cpu_node = dataclasses.replace(cpu, segment_worker="node", worker_address=None)
    assert not segment_node(cpu_node).is_gpu_node()
    assert dict(segment_node(cpu).inputs.get_hashval()[0]) == \
        dict(segment_node(cpu_node).inputs.get_hashval()[0])


def test_interrupted_nifti_write_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old writer wrote an uncompressed .<name>.XXXX.nii next to the target and left it on a kill."""
    from bids_cl.utils.io import atomic_save_nifti

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))

    def killed(self, file_map):  # as if the process were stopped while writing the data
        file_map["image"].fileobj.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_nifti(img, tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_nifti_gzip_is_nibabels_fast_level_and_reproducible(tmp_path: Path) -> None:
    """Derivatives are gzipped at level 1 (nibabel's default; the writer used gzip's 9, 3-9x slower on
    float maps), with a fixed header: two writes are byte-identical and read back exactly."""
    from bids_cl.utils.io import atomic_save_nifti

    data = np.random.default_rng(0).random((20, 22, 18), dtype=np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    a, b = atomic_save_nifti(img, tmp_path / "a.nii.gz"), atomic_save_nifti(img, tmp_path / "b.nii.gz")
    raw = a.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[8] == 4  # gzip XFL byte: 4 = fastest level, 2 = level 9
    assert raw[4:8] == b"\x00\x00\x00\x00"  # mtime 0
    assert raw == b.read_bytes()
    np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), data)


def test_rerun_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    from bids_cl.utils.io import TMP_PREFIX

    item = _item(tmp_path)
    files = _inputs(tmp_path)
    out = tmp_path / "out"
    anat = out / item.anat_dir
    anat.mkdir(parents=True)
    stale = anat / f"{TMP_PREFIX}sub-01_ses-02_label-CL_mask.nii.gz.k2j3.nii.gz"
    stale.write_bytes(b"left by kill -9")
    outputs.write_target_derivatives(
        out, tmp_path / "bids", item, brain=files["brain"], brain_mask=files["mask"],
        skullstrip=SKULLSTRIP, probseg=files["prob"], lesion_mask=files["lesion"],
        lesions_tsv=files["tsv"], segmentation=SEGMENTATION)
    assert not stale.exists()
    assert not [p for p in anat.iterdir() if p.name.startswith(".")]


def test_full_disk_while_writing_is_73_naming_the_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC during writing was 'unexpected OSError' (exit 1, traceback); it is 73, one line, the folder."""
    import errno

    from bids_cl.derivatives.records import TargetRecord
    from bids_cl.errors import BidsClError
    from bids_cl.interfaces import WriteDerivatives
    from bids_cl.utils import io

    item = _item(tmp_path)
    files = _inputs(tmp_path)
    work = tmp_path / "node"
    skull, seg = work / "skullstrip.json", work / "segment.json"
    skull.write_text(SKULLSTRIP.to_json())
    seg.write_text(SEGMENTATION.to_json())
    record = tmp_path / "log" / "targets" / "sub-01_ses-02.json"
    real = io.atomic_write

    def full(path, writer, **kwargs):
        if str(path).endswith("_label-CL_mask.nii.gz"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, writer, **kwargs)

    monkeypatch.setattr("bids_cl.utils.io.atomic_write", full)
    node = WriteDerivatives(output_dir=str(tmp_path / "out"), bids_dir=str(tmp_path / "bids"),
                            item=item.to_dict(), brain=files["brain"], brain_mask=files["mask"],
                            skullstrip_info=str(skull), probseg=files["prob"], lesion_mask=files["lesion"],
                            lesions=files["tsv"], segment_info=str(seg), record_file=str(record),
                            target_prefix=item.prefix)
    with pytest.raises(BidsClError) as err:
        node.run(cwd=str(work))
    assert err.value.code == 73 and "No space left on device" in err.value.message
    assert str(tmp_path / "out" / item.anat_dir) in err.value.message
    failed = TargetRecord.read(record)
    assert (failed.status, failed.exit_code, failed.stage) == ("failed", 73, "writing derivatives")
    assert "\n" not in failed.reason
    # Space is back: the same node completes, and nothing of the failed attempt is left.
    monkeypatch.setattr("bids_cl.utils.io.atomic_write", real)
    node.run(cwd=str(work))
    assert TargetRecord.read(record).ok
    anat = tmp_path / "out" / item.anat_dir
    assert (anat / "sub-01_ses-02_label-CL_desc-summary_stats.json").is_file()
    assert not [p for p in anat.iterdir() if p.name.startswith(".")]


def test_nodes_do_not_hash_the_model_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock was verified in the parent and again in every segmentation node; now once per run."""
    from bids_cl.engine import models, store

    calls = []
    monkeypatch.setattr(store, "verified", lambda folder, what: calls.append(folder))
    models.load_model("demo")
    assert len(calls) == 1
    models.load_model("demo", verify=False)
    assert len(calls) == 1
