"""One segmentation worker for a whole run: the model loaded, and the GPU set up, once for all targets.

Without it every segment node is a fresh process that reads the fold weights, builds the network and
(on a GPU) creates a CUDA context before its image, and the GPU idles while the node reads and
preprocesses. With it (``bids_cl ... --segment-worker shared``, the default on a GPU with a local Nipype
plugin) the runner starts one worker process before the graph runs (:func:`start_worker`); each segment
node sends its image to it (:func:`request_segmentation`) and writes the result as before. Inside the
worker three threads pass images along, so that the next image is read and preprocessed while the
current one is on the device, and the last one is measured meanwhile::

    prepare (CPU: read, check, nnU-Net preprocessing)
      -> infer (the device: every fold's sliding window, the ensemble, the export)
      -> measure (CPU: threshold, size filter, lesion table)

Only one image waits between prepare and infer, so memory stays bounded; Nipype bounds how many images
are in the worker at once (``WORKER_DEPTH`` GPU slots, one per segment node).

The worker listens on a Unix socket in a private folder (mode 0700) and accepts only clients that know
its key (``multiprocessing.connection``'s HMAC handshake); the key is a file beside the socket, readable
by the run's user only. A node that cannot reach the worker (it died, or was never started) segments
the image itself and says so in the target's warnings. The worker ends with the runner, even when the
runner is killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bids_cl.errors import BidsClError, as_bids_cl_error

if TYPE_CHECKING:
    from bids_cl.engine.segmentation import CLSegmenter, SegmentationResult

log = logging.getLogger("bids_cl.engine")

# Images in the worker at once on a GPU: one being prepared, one on the device, one being measured.
WORKER_DEPTH = 3
_SOCKET_NAME = "segment.sock"
_KEY_NAME = "key"
_READY_TIMEOUT_S = 120.0
_SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path on Linux (sun_path, less its final NUL)
_PARENT_POLL_S = 1.0


class WorkerUnavailable(Exception):
    """The shared worker could not be reached, or went away before it answered."""


@dataclass(frozen=True)
class SegmenterSettings:
    """What a segment node asks the engine for: the worker keeps one ``CLSegmenter`` per distinct value."""

    model: str
    device: str = "auto"
    folds: tuple[int, ...] | None = None
    tta: bool | None = None
    threshold: float | None = None
    min_lesion_size: str | None = None
    connectivity: int = 26
    nthreads: int | None = None
    model_verified: bool = False

    def build(self) -> CLSegmenter:
        """The configured segmenter (the model's lock is checked unless the run verified it already)."""
        from bids_cl.engine.models import load_model
        from bids_cl.engine.segmentation import CLSegmenter

        return CLSegmenter(load_model(self.model, verify=not self.model_verified), device=self.device,
                           folds=self.folds, tta=self.tta, threshold=self.threshold,
                           min_lesion_size=self.min_lesion_size, connectivity=self.connectivity,
                           nthreads=self.nthreads, keep_fold_probabilities=False)


@dataclass
class _Job:
    settings: SegmenterSettings
    image: str
    brain_mask: str | None
    received: float = dataclasses.field(default_factory=time.perf_counter)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    segmenter: Any = None
    stage_input: Any = None
    setup_seconds: float = 0.0
    busy_seconds: float = 0.0
    result: Any = None
    failure: BidsClError | None = None


class _Pipeline:
    """The worker's three stage threads and the segmenters they share."""

    def __init__(self) -> None:
        self.to_prepare: queue.Queue[_Job] = queue.Queue()
        self.to_infer: queue.Queue[_Job] = queue.Queue(maxsize=1)  # one image prefetched, no more
        self.to_measure: queue.Queue[_Job] = queue.Queue()
        self._segmenters: dict[SegmenterSettings, Any] = {}
        self._lock = threading.Lock()
        for name, source, stage, on_failure in (
                ("prepare", self.to_prepare, self._prepare, None),
                # a CUDA out-of-memory must not fail the next image too
                ("infer", self.to_infer, self._infer, _release_device_memory),
                ("measure", self.to_measure, self._measure, None)):
            threading.Thread(target=self._loop, args=(source, stage, on_failure), name=f"bids_cl-{name}",
                             daemon=True).start()

    def _segmenter(self, job: _Job) -> Any:
        with self._lock:
            segmenter = self._segmenters.get(job.settings)
            if segmenter is None:
                start = time.perf_counter()
                segmenter = self._segmenters[job.settings] = job.settings.build()
                job.setup_seconds = time.perf_counter() - start
        return segmenter

    @staticmethod
    def _loop(source: queue.Queue[_Job], stage, on_failure) -> None:
        while True:
            job = source.get()
            start = time.perf_counter()
            try:
                following = stage(job)
            except Exception as exc:  # noqa: BLE001 - the image's failure goes back to its node
                if on_failure is not None:
                    on_failure()
                job.failure = as_bids_cl_error(exc)
                job.stage_input = None
                job.done.set()
                continue
            job.busy_seconds += time.perf_counter() - start
            if following is not None:
                following.put(job)  # blocks while the device has an image waiting already

    def _prepare(self, job: _Job) -> queue.Queue[_Job]:
        job.segmenter = self._segmenter(job)
        job.stage_input = job.segmenter.prepare(job.image, brain_mask=job.brain_mask)
        return self.to_infer

    def _infer(self, job: _Job) -> queue.Queue[_Job]:
        job.stage_input = job.segmenter.infer(job.stage_input)
        return self.to_measure

    def _measure(self, job: _Job) -> None:
        start = time.perf_counter()
        result = job.segmenter.measure(job.stage_input)
        job.stage_input = None
        # What the node writes travels back; the label image is not written, so it stays here.
        result.labels = None
        now = time.perf_counter()
        # Time this image spent queued between stages (behind other images), not worked on.
        waited = (now - job.received) - job.busy_seconds - (now - start)
        timings = {"load_model": round(job.setup_seconds, 3), "worker_wait": round(max(0.0, waited), 3),
                   **result.record.timings}
        result.record = dataclasses.replace(result.record, timings=timings)
        result.timings = dict(timings)
        job.result = result
        job.done.set()


def _release_device_memory() -> None:
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _serve_client(conn: connection.Connection, pipeline: _Pipeline) -> None:
    with conn:
        try:
            kind, settings, image, brain_mask = conn.recv()
        except Exception:  # noqa: BLE001 - a malformed request is dropped, the worker keeps serving
            return
        if kind != "segment" or not isinstance(settings, SegmenterSettings):
            with contextlib.suppress(OSError):
                conn.send(("failed", 1, f"the segmentation worker does not know the request {kind!r}"))
            return
        job = _Job(settings=settings, image=image, brain_mask=brain_mask)
        pipeline.to_prepare.put(job)
        job.done.wait()
        reply = ("ok", job.result) if job.failure is None else \
            ("failed", job.failure.code, job.failure.message)
        with contextlib.suppress(OSError):
            conn.send(reply)


def _watch_parent(parent_pid: int, folder: Path) -> None:
    # The worker must not outlive its run, even when the runner is killed (SIGKILL skips its clean-up,
    # so the worker removes its socket folder itself).
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def _serve(address: str, authkey: bytes, ready: connection.Connection, parent_pid: int,
           nthreads: int | None) -> None:
    try:
        import torch

        if nthreads:
            torch.set_num_threads(int(nthreads))
        # The runner's Ctrl-C handling is the runner's: the worker ends when told to, or when orphaned.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        threading.Thread(target=_watch_parent, args=(parent_pid, Path(address).parent),
                         daemon=True).start()
        listener = connection.Listener(address, family="AF_UNIX", authkey=authkey)
        pipeline = _Pipeline()
    except Exception as exc:  # noqa: BLE001 - told to the runner in one line, never a traceback
        ready.send(("failed", f"{type(exc).__name__}: {exc}"))
        ready.close()
        os._exit(1)
    ready.send(("ready", os.getpid()))
    ready.close()
    while True:
        try:
            conn = listener.accept()
        except connection.AuthenticationError:
            log.warning("segmentation worker: refused a client without the run's key")
            continue
        except OSError:
            os._exit(0)
        threading.Thread(target=_serve_client, args=(conn, pipeline), daemon=True).start()


@dataclass
class WorkerHandle:
    """The running worker: ``address`` is what the segment nodes are given."""

    address: str
    process: Any
    folder: Path

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        shutil.rmtree(self.folder, ignore_errors=True)


def _private_folder() -> Path:
    """A new folder of mode 0700 for the socket: in the temporary folder, else /tmp where its path would
    be too long for a Unix socket (HPC job folders often are; the limit is 107 bytes on Linux)."""
    tried = []
    for base in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        if len(os.fsencode(base)) + len(_SOCKET_NAME) + 24 > _SOCKET_PATH_MAX:
            tried.append(f"{base}: path too long for a socket")
            continue
        try:
            return Path(tempfile.mkdtemp(prefix="bids_cl-worker-", dir=base))
        except OSError as exc:
            tried.append(f"{base}: {exc.strerror or exc}")
    raise WorkerUnavailable("no folder for the segmentation worker's socket (" + "; ".join(tried) + ")")


def start_worker(*, nthreads: int | None = None) -> WorkerHandle:
    """Fork the run's segmentation worker and wait until it listens.

    Forked, as Nipype's MultiProc workers are, before any CUDA context exists in the runner (a forked
    process cannot use its parent's). Raises ``WorkerUnavailable`` when it does not come up.
    """
    import multiprocessing

    folder = _private_folder()
    address = str(folder / _SOCKET_NAME)
    authkey = secrets.token_bytes(32)
    try:
        key_file = folder / _KEY_NAME
        key_file.touch(mode=0o600)
        key_file.write_bytes(authkey)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise WorkerUnavailable(f"cannot write the segmentation worker's key in {folder}: "
                                f"{exc.strerror or exc}") from None
    context = multiprocessing.get_context("fork")
    ready_here, ready_there = context.Pipe(duplex=False)
    process = context.Process(target=_serve, name="bids_cl-segment-worker",
                              args=(address, authkey, ready_there, os.getpid(), nthreads))
    process.start()
    ready_there.close()
    handle = WorkerHandle(address=address, process=process, folder=folder)
    try:
        if not ready_here.poll(_READY_TIMEOUT_S):
            raise WorkerUnavailable(f"the segmentation worker did not start in {_READY_TIMEOUT_S:.0f} s")
        state, detail = ready_here.recv()
        if state != "ready":
            raise WorkerUnavailable(detail)
    except (EOFError, OSError, WorkerUnavailable) as exc:
        handle.stop()
        raise WorkerUnavailable(f"the segmentation worker did not start ({exc or 'it exited'})") from None
    finally:
        ready_here.close()
    return handle


@contextlib.contextmanager
def running_worker(*, nthreads: int | None = None) -> Iterator[WorkerHandle]:
    """``start_worker`` for the length of a ``with`` block."""
    handle = start_worker(nthreads=nthreads)
    try:
        yield handle
    finally:
        handle.stop()


def request_segmentation(address: str, settings: SegmenterSettings, image: str,
                         brain_mask: str | None = None) -> SegmentationResult:
    """Segment ``image`` in the worker at ``address``; its result (the label image left out).

    The image's own failures come back as the ``BidsClError`` the node would have raised itself;
    ``WorkerUnavailable`` when the worker cannot be reached or goes away before it answers.
    """
    folder = Path(address).parent
    try:
        authkey = (folder / _KEY_NAME).read_bytes()
        with connection.Client(address, family="AF_UNIX", authkey=authkey) as conn:
            conn.send(("segment", settings, str(image), None if brain_mask is None else str(brain_mask)))
            reply = conn.recv()
    except (OSError, EOFError, connection.AuthenticationError) as exc:
        raise WorkerUnavailable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) \
            from None
    if reply[0] == "ok":
        return reply[1]
    _, code, message = reply
    raise BidsClError(message, code)
