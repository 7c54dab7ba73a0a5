"""The run's shared segmentation worker (bids_cl.engine.worker): same results as a node segmenting by
itself, images pipelined through its stages, failures passed back, a node that falls back when the
worker is gone, strangers refused, and no worker outliving its run."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cl.engine import testing as T
from bids_cl.engine import worker as W
from bids_cl.errors import EXIT_BAD_DATA, BidsClError
from bids_cl.interfaces import steps

SHAPE = (40, 44, 36)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two folds that disagree (the lesion table's fold uncertainty crosses the worker too)."""
    plans, dj = T.tiny_plans(norm=False), T.tiny_dataset_json()
    return str(T.write_model_folder(
        tmp_path_factory.mktemp("worker_model") / "model", plans, dj,
        {0: T.intensity_weights(plans, dj, z_threshold=3.0),
         1: T.intensity_weights(plans, dj, z_threshold=8.0)}))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """Three skull-stripped phantoms (brain, brain mask) with lesions in different places."""
    root = tmp_path_factory.mktemp("worker_images")
    out = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        blobs = [(tuple(rng.uniform(-8, 8, 3)), float(rng.uniform(1.5, 2.5))) for _ in range(3)]
        img = T.phantom(SHAPE, T.centred_affine(SHAPE), brain_radii=(16, 18, 14), blobs=blobs, seed=seed)
        data = np.asanyarray(img.dataobj)
        brain, mask = root / f"brain{seed}.nii.gz", root / f"mask{seed}.nii.gz"
        nib.save(img, brain)
        nib.save(nib.Nifti1Image((data != 0).astype(np.uint8), img.affine), mask)
        out.append((str(brain), str(mask)))
    return out


@pytest.fixture(scope="module")
def worker():
    with W.running_worker(nthreads=1) as handle:
        yield handle


def _settings(model: str) -> W.SegmenterSettings:
    return W.SegmenterSettings(model=model, device="cpu", nthreads=1)


def _outputs(folder: Path) -> dict[str, object]:
    record = json.loads((folder / "segment.json").read_text())
    return {
        "probseg": np.asanyarray(nib.load(folder / "probseg.nii.gz").dataobj),
        "mask": np.asanyarray(nib.load(folder / "lesion_mask.nii.gz").dataobj),
        "lesions": (folder / "lesions.tsv").read_text(),
        "record": {k: v for k, v in record.items() if k != "timings"},
        "timings": record["timings"],
    }


def test_shared_worker_writes_what_the_node_writes(model: str, images, worker, tmp_path: Path) -> None:
    """Same probability, mask, lesion table and record, whether the node or the shared worker segments."""
    for i, (brain, mask) in enumerate(images):
        alone, shared = tmp_path / f"alone{i}", tmp_path / f"shared{i}"
        alone.mkdir()
        shared.mkdir()
        kwargs = {"model": model, "mask_file": mask, "device": "cpu", "nthreads": 1}
        steps.segment_files(brain, str(alone), **kwargs)
        steps.segment_files(brain, str(shared), worker=worker.address, **kwargs)
        a, s = _outputs(alone), _outputs(shared)
        assert np.array_equal(a["probseg"], s["probseg"])
        assert np.array_equal(a["mask"], s["mask"])
        assert a["mask"].any()
        assert a["lesions"] == s["lesions"]
        assert a["record"] == s["record"]
        assert "worker_wait" in s["timings"] and "worker_wait" not in a["timings"]


def test_model_loaded_once_and_images_in_flight_together(model: str, images) -> None:
    """Three nodes at once: the first pays the model's set-up, the others find it loaded; all three
    results come back, each its own image's."""
    settings = _settings(model)
    with W.running_worker(nthreads=1) as handle:
        results: dict[int, object] = {}

        def ask(i: int) -> None:
            results[i] = W.request_segmentation(handle.address, settings, *images[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    setups = sorted(r.record.timings["load_model"] for r in results.values())
    assert setups[0] == setups[1] == 0.0 < setups[2]
    alone = settings.build()
    for i, (brain, mask) in enumerate(images):
        expected = alone.segment(brain, brain_mask=mask)
        assert np.array_equal(np.asanyarray(expected.probability.dataobj),
                              np.asanyarray(results[i].probability.dataobj))
        assert results[i].labels is None  # not written by the node, so not sent back


@dataclass(frozen=True)
class _RecordingSettings:
    """Stands in for SegmenterSettings: a segmenter whose stages sleep and log when they run."""

    seconds: float = 0.3

    def build(self):
        return _RecordingSegmenter(self.seconds)


class _RecordingSegmenter:
    events: list[tuple[str, str, float, float]] = []

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def _stage(self, name: str, image: str) -> str:
        start = time.perf_counter()
        time.sleep(self.seconds)
        self.events.append((name, image, start, time.perf_counter()))
        return image

    def prepare(self, image, *, brain_mask=None):
        if image == "bad":
            raise BidsClError("the image is empty (no non-zero voxel inside the brain)", EXIT_BAD_DATA)
        return self._stage("prepare", image)

    def infer(self, prepared):
        return self._stage("infer", prepared)

    def measure(self, inferred):
        from types import SimpleNamespace

        from bids_cl.derivatives.records import SegmentationRecord

        self._stage("measure", inferred)
        record = SegmentationRecord(threshold=0.5, threshold_source="default", connectivity=26,
                                    min_lesion_size=None, min_lesion_size_source="default",
                                    min_lesion_size_voxels=None, folds=[0], tta=False, device="cpu",
                                    fast_path=True, threads=1, precision="fp32", orientation={},
                                    tiles_run=None, tiles_total=None, ood_warning=None, warnings=[],
                                    provenance={}, timings={})
        return SimpleNamespace(image=inferred, record=record, labels="not sent", timings={})


def test_next_image_is_prepared_while_the_device_works() -> None:
    """The pipeline: image 2 is read and preprocessed while image 1 is on the device, and a failing
    image fails alone (its node gets the one-line reason and code) without stopping the others."""
    _RecordingSegmenter.events = []
    pipeline = W._Pipeline()
    jobs = [W._Job(settings=_RecordingSettings(), image=name, brain_mask=None)
            for name in ("one", "bad", "two", "three")]
    for job in jobs:
        pipeline.to_prepare.put(job)
    for job in jobs:
        assert job.done.wait(30)
    assert jobs[1].failure is not None and jobs[1].failure.code == EXIT_BAD_DATA
    assert "empty" in jobs[1].failure.message
    assert [j.result.image for j in jobs if j.failure is None] == ["one", "two", "three"]
    when = {(name, image): (start, end) for name, image, start, end in _RecordingSegmenter.events}
    # image two's prepare ran during image one's infer, image three's during image two's
    assert when["prepare", "two"][0] < when["infer", "one"][1]
    assert when["prepare", "three"][0] < when["infer", "two"][1]
    assert when["infer", "two"][0] >= when["infer", "one"][1]  # one image on the device at a time
    waits = [j.result.record.timings["worker_wait"] for j in jobs if j.failure is None]
    assert waits[0] < 0.3 < 0.5 < waits[-1]  # image three waited for the prepare of one and two


def test_an_image_failure_comes_back_as_the_nodes_error(model: str, worker, tmp_path: Path) -> None:
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), T.centred_affine(SHAPE)), empty)
    with pytest.raises(BidsClError) as shared:
        W.request_segmentation(worker.address, _settings(model), str(empty))
    with pytest.raises(BidsClError) as alone:
        _settings(model).build().segment(str(empty))
    assert (shared.value.code, shared.value.message) == (alone.value.code, alone.value.message)
    assert shared.value.code == EXIT_BAD_DATA


def test_node_segments_itself_when_the_worker_is_gone(model: str, images, tmp_path: Path) -> None:
    handle = W.start_worker(nthreads=1)
    address = handle.address
    handle.stop()
    brain, mask = images[0]
    files = steps.segment_files(brain, str(tmp_path), model=model, mask_file=mask, device="cpu",
                                nthreads=1, worker=address)
    record = json.loads(Path(files["info"]).read_text())
    assert any("shared segmentation worker was not reachable" in w for w in record["warnings"])
    assert np.asanyarray(nib.load(files["mask"]).dataobj).any()


def test_a_client_without_the_key_is_refused(model: str, images, worker) -> None:
    from multiprocessing import connection

    with pytest.raises((connection.AuthenticationError, EOFError, OSError)):
        with connection.Client(worker.address, family="AF_UNIX", authkey=b"not the run's key") as conn:
            conn.send(("segment", _settings(model), *images[0]))
            conn.recv()
    folder = Path(worker.address).parent
    key = (folder / "key").read_bytes()
    for malformed in (("segment",), ("shutdown", None, None, None), "not a tuple"):
        with connection.Client(worker.address, family="AF_UNIX", authkey=key) as conn:
            conn.send(malformed)
            with pytest.raises((EOFError, OSError)):
                assert conn.recv()[0] == "failed"  # refused with one line, or dropped
                conn.recv()
    assert W.request_segmentation(worker.address, _settings(model), *images[0]).mask is not None
    assert folder.stat().st_mode & 0o077 == 0  # the socket's folder is the run user's only
    assert (folder / "key").stat().st_mode & 0o077 == 0


def _start_worker_then_wait(pipe) -> None:
    handle = W.start_worker(nthreads=1)
    pipe.send((handle.process.pid, handle.address))
    time.sleep(600)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state


def test_worker_ends_when_its_runner_is_killed() -> None:
    """SIGKILL skips every clean-up of the runner: the worker still ends, it never holds the GPU on."""
    here, there = multiprocessing.get_context("fork").Pipe()
    runner = multiprocessing.get_context("fork").Process(target=_start_worker_then_wait, args=(there,))
    runner.start()
    assert here.poll(60)
    worker_pid, address = here.recv()
    assert not _gone(worker_pid)
    os.kill(runner.pid, signal.SIGKILL)
    runner.join()
    deadline = time.time() + 15
    while time.time() < deadline and not _gone(worker_pid):
        time.sleep(0.2)
    assert _gone(worker_pid)
    assert not Path(address).parent.exists()  # nor its socket and key


_CUDA_SCRIPT = """
import sys
import numpy as np
from bids_cl.engine import worker as W
from bids_cl.engine.device import resolve_device

model, images = sys.argv[1], sys.argv[2:]
assert resolve_device("auto").type == "cuda"  # the runner's check, made before it forks the worker
settings = W.SegmenterSettings(model=model, device="cuda", nthreads=2)
with W.running_worker(nthreads=2) as handle:
    shared = [W.request_segmentation(handle.address, settings, image) for image in images]
alone = settings.build()  # CUDA in this process only now, after the fork
for image, result in zip(images, shared):
    expected = alone.segment(image)
    a, b = (np.asanyarray(r.probability.dataobj) for r in (expected, result))
    assert float(np.abs(a - b).max()) < 1e-4, float(np.abs(a - b).max())
    assert np.mean(np.asanyarray(expected.mask.dataobj) != np.asanyarray(result.mask.dataobj)) <= 1e-4
    assert result.record.device == "cuda"
print("worker on the GPU: ok")
"""


def _cuda() -> bool:
    from bids_cl.engine.device import cuda_available

    return cuda_available()


@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU (benchmarks/gpu_check.sh)")
def test_worker_on_the_gpu_forked_after_the_runners_device_check(model: str, images) -> None:
    """In a fresh process, in the runner's order (device check, fork, CUDA in the worker): the shared
    worker segments on the GPU what the process itself then segments there."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CUDA_SCRIPT, model, *[b for b, _ in images]],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker on the GPU: ok" in proc.stdout


def test_socket_folder_falls_back_to_tmp_when_the_temporary_folder_is_too_deep(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HPC job folders ($TMPDIR) are often deeper than a Unix socket's 107 bytes allow."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(W.tempfile, "gettempdir", lambda: str(deep))
    with W.running_worker(nthreads=1) as handle:
        assert handle.address.startswith("/tmp/bids_cl-worker-")
        assert len(handle.address) < 107


def test_a_worker_that_cannot_start_is_one_line_not_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    def no_socket(*args, **kwargs):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(W.connection, "Listener", no_socket)  # the forked worker inherits it
    with pytest.raises(W.WorkerUnavailable) as err:
        W.start_worker(nthreads=1)
    assert "did not start" in str(err.value) and "Address already in use" in str(err.value)
    assert "Traceback" not in capfd.readouterr().err

    def no_folder(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(W.tempfile, "mkdtemp", no_folder)
    with pytest.raises(W.WorkerUnavailable) as err:
        W.start_worker(nthreads=1)
    assert "No space left on device" in str(err.value)


def test_runner_goes_on_without_a_worker_that_cannot_start(monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from bids_cl.cli import workflow
    from bids_cl.config import ResolvedRun

    def refuse(**kwargs):
        raise W.WorkerUnavailable("the segmentation worker did not start (OSError: no socket)")

    monkeypatch.setattr(W, "start_worker", refuse)
    resolved = ResolvedRun(device="cpu", nprocs=2, omp_nthreads=2, mem_mb=None, model="demo",
                           random_seed=1, segment_worker="shared")
    assert workflow._start_segment_worker(resolved) is None
    assert "each segmentation node loads the model itself" in caplog.text
