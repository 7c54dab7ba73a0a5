"""nnU-Net v2 inference: the stock ``nnUNetPredictor`` and a faster subclass that only replaces the
sliding-window step.

``FastPredictor`` overrides ``predict_sliding_window_return_logits`` and nothing else: preprocessing
(crop to non-zero, z-score, resampling), the fold loop and the export (resampling back, softmax, revert
cropping) stay nnU-Net's own. What it changes in the sliding window:

* tiles that hold no brain voxel (nnU-Net's own non-zero region, as resampled by its preprocessing) are not
  run: on a skull-stripped image their voxels are background by construction;
* mirror variants (TTA) of a tile and several tiles go through the network as one batch;
* aggregation happens on the device in float32 (stock: float16), so the result is at least as exact;
* on CUDA the network runs under fp16 autocast (as stock) and may be ``torch.compile``d, then in
  channels-last memory format (worth it when one process segments many images: compiling takes ~20 s);
* on CPUs, the 1x1x1 segmentation head runs as a matrix product (oneDNN's 1x1x1 convolution is slow),
  tiles run concurrently on worker threads that share the thread budget instead of one tile on all
  OpenMP threads, instance norms run as group norms with one group per channel (same maths, faster
  kernel) and the network runs in channels-last memory format; ``precision="bf16"`` (opt-in) uses bf16
  autocast on CPUs with native bf16 (AMX/AVX512-BF16).

Outputs agree with stock to float rounding inside the brain; ``tests/test_engine_fast.py`` and
``benchmarks/inference.py`` measure the agreement.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

log = logging.getLogger("bids_cl.engine")

# Logit given to the background class where no tile was run (outside the brain): P(lesion) ~ 2e-9.
_SKIPPED_BACKGROUND_LOGIT = 20.0


@contextlib.contextmanager
def quiet_stdout():
    """nnU-Net prints progress to stdout; keep the BIDS-App's stdout clean (logged at debug level)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    text = buffer.getvalue().strip()
    if text:
        log.debug("nnU-Net: %s", text)


def _is_channels_last(x: torch.Tensor) -> bool:
    """A 5-D tensor laid out channels-last (and not also contiguous, as a 1-channel one would be)."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def logits_device(predictor: nnUNetPredictor) -> torch.device:
    """Where a predictor's sliding window leaves the logits: on the GPU when it works on the device
    (nnU-Net's ``perform_everything_on_device``), else on the CPU."""
    on_device = predictor.device.type == "cuda" and predictor.perform_everything_on_device
    return predictor.device if on_device else torch.device("cpu")


class _MatmulHead(torch.nn.Module):
    """A 1x1x1 convolution computed as one matrix product (same maths, far faster on oneDNN CPUs).

    It holds the convolution's own ``weight``/``bias`` parameters, so state-dict names are unchanged and
    fold weights load as they are.
    """

    def __init__(self, conv: torch.nn.Conv3d) -> None:
        super().__init__()
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        if _is_channels_last(x):
            # Channels-last: the channels are the innermost axis already; no copy to (N, C, -1).
            w = self.weight.reshape(self.out_channels, self.in_channels).to(x.dtype)
            out = torch.matmul(x.permute(0, 2, 3, 4, 1), w.t())
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.permute(0, 4, 1, 2, 3)
        flat = x.reshape(n, c, -1)
        w = self.weight.reshape(self.out_channels, self.in_channels).to(flat.dtype)
        out = torch.matmul(w, flat)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).view(1, -1, 1)
        return out.view(n, self.out_channels, *x.shape[2:])


def _swap_matmul_heads(network: torch.nn.Module) -> None:
    decoder = getattr(network, "decoder", None)
    heads = getattr(decoder, "seg_layers", None)
    if not isinstance(heads, torch.nn.ModuleList):
        return
    for idx, layer in enumerate(heads):
        if isinstance(layer, torch.nn.Conv3d) and tuple(layer.kernel_size) == (1, 1, 1) \
                and layer.groups == 1 and tuple(layer.stride) == (1, 1, 1):
            heads[idx] = _MatmulHead(layer)


class _InstanceNormAsGroupNorm(torch.nn.Module):
    """Affine instance norm computed by ``group_norm`` with one group per channel.

    The same statistics (per sample and channel, biased variance) and the same parameters, but
    PyTorch's CPU group-norm kernel is several times faster than its instance-norm path (which goes
    through batch norm on a reshaped copy). Channels-last input goes through
    ``channels_last_instance_norm``; ``in_place`` (set where the input is the preceding convolution's own
    output, nothing else holds it) lets that work in the input's memory under inference mode.
    """

    def __init__(self, norm: torch.nn.InstanceNorm3d, *, in_place: bool = False) -> None:
        super().__init__()
        self.num_features, self.eps = norm.num_features, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_channels_last(x):
            in_place = self.in_place and torch.is_inference_mode_enabled()
            return channels_last_instance_norm(x, self.weight, self.bias, self.eps, in_place=in_place)
        return torch.nn.functional.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


def channels_last_instance_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                                eps: float, *, in_place: bool = False) -> torch.Tensor:
    """Instance norm of a channels-last (N, C, D, H, W) tensor, as accurate as the contiguous kernel.

    PyTorch's channels-last group-norm kernel accumulates its sums naively in float32: on a 112x128x160
    feature map its error reached 1.5e-3 (contiguous: 1.5e-6), and with a large mean over a small spread
    (mean 100, std 0.01) it returned garbage. Here the per-channel mean of a 1/64 subsample is subtracted
    first (so E[d^2] - E[d]^2 cancels nothing), and torch's cascade-summed means give the statistics:
    1.6e-6 and 2.2e-6 in those two cases. The output stays channels-last. ``in_place`` overwrites ``x``
    (2.7x faster on large maps: no fresh pages to fault in).
    """
    dims = (2, 3, 4)
    if x.dtype != torch.float32:  # bf16 autocast: statistics in float32, as autocast runs group_norm
        x, in_place = x.float(), True  # a fresh copy: nothing else holds it
    shift = x[:, :, ::4, ::4, ::4].mean(dims, keepdim=True)
    d = x.sub_(shift) if in_place else x - shift
    mean = d.mean(dims, keepdim=True)
    var = (d.square().mean(dims, keepdim=True) - mean * mean).clamp_min_(0.0)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.view(1, -1, 1, 1, 1).to(scale.dtype)
    offset = -mean * scale
    if bias is not None:
        offset = offset + bias.view(1, -1, 1, 1, 1).to(offset.dtype)
    if in_place:
        return d.mul_(scale).add_(offset)
    return torch.addcmul(offset, d, scale)


def _swap_instance_norms(network: torch.nn.Module) -> None:
    # nnU-Net's ConvDropoutNormReLU runs Sequential(conv, [dropout], norm, nonlin): there the norm's input
    # is the convolution's fresh output (dropout is the identity at inference), so it may be overwritten.
    # The block also holds the norm as an attribute: one replacement per norm keeps both names pointing
    # at the same module.
    conv = torch.nn.Conv3d
    fed_by_conv = {id(m) for seq in network.modules()
                   if isinstance(seq, torch.nn.Sequential) and len(seq) and isinstance(seq[0], conv)
                   for m in seq}
    replacements: dict[int, torch.nn.Module] = {}

    def swap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.InstanceNorm3d) and child.affine and not child.track_running_stats:
                if id(child) not in replacements:
                    replacements[id(child)] = _InstanceNormAsGroupNorm(
                        child, in_place=id(child) in fed_by_conv)
                setattr(module, name, replacements[id(child)])
            else:
                swap(child)

    swap(network)


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16): only then is bf16 faster."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def mirror_combinations(axes: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    """All non-empty flip combinations of the spatial ``axes`` (tensor dims, i.e. +2), plus no flip."""
    if not axes:
        return [()]
    dims = [a + 2 for a in axes]
    return [()] + [c for i in range(len(dims)) for c in itertools.combinations(dims, i + 1)]


def tiles_with_foreground(mask: torch.Tensor, slicers: list[tuple]) -> list[bool]:
    """Whether each tile (nnU-Net slicer, channel dim first) holds any foreground voxel.

    Uses a 3-D summed-area table so every tile costs O(1) whatever its size.
    """
    m = mask.to(torch.int32)
    sat = torch.zeros(tuple(s + 1 for s in m.shape), dtype=torch.int64)
    sat[1:, 1:, 1:] = m.cumsum(0).cumsum(1).cumsum(2)
    keep = []
    for sl in slicers:
        (x0, x1), (y0, y1), (z0, z1) = [(s.start, s.stop) for s in sl[1:]]
        total = (sat[x1, y1, z1] - sat[x0, y1, z1] - sat[x1, y0, z1] - sat[x1, y1, z0]
                 + sat[x0, y0, z1] + sat[x0, y1, z0] + sat[x1, y0, z0] - sat[x0, y0, z0])
        keep.append(bool(total > 0))
    return keep


class FastPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` with a batched, tile-skipping, on-device sliding window.

    Set ``tile_mask`` (bool tensor, the preprocessed image's spatial shape, True = brain) before calling
    ``predict_sliding_window_return_logits`` to skip empty tiles; ``None`` runs every tile.
    """

    def __init__(self, *args: Any, tile_batch_size: int | None = None, compile_network: bool = False,
                 channels_last: bool | None = None, precision: str | None = None, **kwargs: Any) -> None:
        with quiet_stdout():
            super().__init__(*args, **kwargs)
        cuda = self.device.type == "cuda"
        # CPU: tiles run one per worker thread (batching them gains nothing measurable there).
        self.tile_batch_size = tile_batch_size or (8 if cuda else 1)
        self.compile_network = compile_network and cuda
        # CUDA: channels-last helps only together with torch.compile (measured on an H200: compiled 1.8x
        # stock; eager channels-last 0.9x, the instance norms then copy between layouts). CPU: oneDNN's
        # convolutions run channels-last without reordering every layer, and the instance norms stay
        # channels-last (channels_last_instance_norm): paper network, one tile, 1 thread, 8.1 s instead
        # of 9.1 s with the norm out of place, logits within 4e-5 of the contiguous path; in place (the
        # default inside nnU-Net's blocks) the sliding window is 1.57x stock on 2 cores (docs/engine.md).
        if channels_last is None:
            channels_last = self.compile_network if cuda else True
        self.channels_last = channels_last
        # fp16 autocast on CUDA, as stock nnU-Net; fp32 on CPU (exact) unless bf16 is asked for.
        self.precision = precision or ("fp16" if cuda else "fp32")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, not {self.precision!r}")
        if not cuda and self.precision == "fp16":
            raise ValueError("fp16 is for CUDA; on a CPU use fp32 or bf16")
        if not cuda and self.precision == "bf16" and not cpu_supports_bf16():
            log.warning("bf16 requested but this CPU has no native bf16 (AMX/AVX512-BF16): it will be slow")
        self.tile_mask: torch.Tensor | None = None
        self.cpu_threads: int | None = None   # threads the CPU path may use (default: torch's setting)
        self.cpu_workers: int | None = None   # tile workers on CPU (default: automatic, see _cpu_workers)
        self.last_stats: dict[str, Any] = {}
        self._prepared: torch.nn.Module | None = None
        self._step = 0

    def manual_initialization(self, network: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        if self.device.type == "cpu":  # cuDNN handles both well; only oneDNN needs the help
            _swap_matmul_heads(network)
            _swap_instance_norms(network)
        with quiet_stdout():
            super().manual_initialization(network, *args, **kwargs)
        self._prepared = None

    def _network(self) -> torch.nn.Module:
        if self._prepared is None:
            net = self.network.to(self.device).eval()
            if self.channels_last:
                net = net.to(memory_format=torch.channels_last_3d)
            if self.compile_network and not hasattr(net, "_orig_mod"):
                net = torch.compile(net)
            self._prepared = net
        return self._prepared

    def _forward_mirrored(self, net: torch.nn.Module, tiles: torch.Tensor,
                          combos: list[tuple[int, ...]]) -> torch.Tensor:
        """Mean over mirror variants of the network output for a batch of tiles (N, C, *patch)."""
        n = tiles.shape[0]
        variants = torch.cat([torch.flip(tiles, c) if c else tiles for c in combos], 0)
        if self.channels_last:
            variants = variants.contiguous(memory_format=torch.channels_last_3d)
        outs = []
        step = self._step or max(self.tile_batch_size, 1)
        for start in range(0, variants.shape[0], step):
            chunk = variants[start:start + step]
            pad = step - chunk.shape[0] if self.compile_network else 0
            if pad:  # static shapes avoid recompilation; instance norm keeps samples independent
                chunk = torch.cat([chunk, chunk.new_zeros((pad, *chunk.shape[1:]))], 0)
            out = net(chunk)
            outs.append(out[:out.shape[0] - pad].float())
        out = torch.cat(outs, 0)
        total = None
        for idx, c in enumerate(combos):
            part = out[idx * n:(idx + 1) * n]
            part = torch.flip(part, c) if c else part
            total = part if total is None else total + part
        return total / len(combos)

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _cpu_workers(self, n_groups: int) -> tuple[int, int]:
        """(worker threads, intra-op threads each) for the CPU sliding window.

        Independent tiles on separate single-threaded workers scale better than one tile on several
        OpenMP threads (no barriers: robust on oversubscribed, shared nodes). Each worker holds one tile's
        activations, so the count is capped by a memory budget.
        """
        threads = max(1, self.cpu_threads or torch.get_num_threads())
        workers = self.cpu_workers or min(threads, _MAX_CPU_WORKERS)
        per_tile = _tile_memory_bytes(self.network, tuple(self.configuration_manager.patch_size))
        budget = _cpu_worker_memory_budget()
        if per_tile:
            workers = min(workers, max(1, int(budget // per_tile)))
        workers = max(1, min(workers, n_groups, threads))
        return workers, max(1, threads // workers)

    def _predict_group(self, net: torch.nn.Module, data: torch.Tensor, group: list[tuple],
                       combos: list[tuple[int, ...]]) -> torch.Tensor:
        # inference mode and autocast are thread-local: set them here, for worker threads too.
        with torch.inference_mode(), self._autocast():
            tiles = torch.stack([data[s] for s in group], 0)
            return self._forward_mirrored(net, tiles, combos)

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        from concurrent.futures import ThreadPoolExecutor

        from acvl_utils.cropping_and_padding.padding import pad_nd_image

        assert isinstance(input_image, torch.Tensor) and input_image.ndim == 4
        net = self._network()
        patch = tuple(self.configuration_manager.patch_size)
        cuda = self.device.type == "cuda"
        results_device = logits_device(self)
        data, revert = pad_nd_image(input_image, patch, "constant", {"value": 0}, True, None)
        slicers = self._internal_get_sliding_window_slicers(data.shape[1:])
        if self.tile_mask is not None:
            mask = self.tile_mask.bool()
            if tuple(mask.shape) != tuple(input_image.shape[1:]):
                raise ValueError(f"tile_mask {tuple(mask.shape)} does not match the image "
                                 f"{tuple(input_image.shape[1:])}")
            mask, _ = pad_nd_image(mask[None], patch, "constant", {"value": False}, True, None)
            keep = tiles_with_foreground(mask[0], slicers)
        else:
            keep = [True] * len(slicers)
        run = [s for s, k in zip(slicers, keep, strict=True) if k]
        combos = mirror_combinations(self.allowed_mirroring_axes if self.use_mirroring else None)
        # With mirroring the mirror variants already fill a batch: one tile at a time.
        per_step = 1 if len(combos) > 1 else self.tile_batch_size
        groups = [run[i:i + per_step] for i in range(0, len(run), per_step)]
        # Network batch: never more than there is work, so a compiled network is not padded for nothing.
        self._step = max(1, min(self.tile_batch_size, len(run) * len(combos)))
        workers, per_worker = (1, 0) if cuda else self._cpu_workers(len(groups))
        self.last_stats = {"tiles": len(slicers), "tiles_run": len(run), "mirrors": len(combos),
                           "workers": workers}

        n_heads = self.label_manager.num_segmentation_heads
        logits = torch.zeros((n_heads, *data.shape[1:]), dtype=torch.float32, device=results_device)
        weight = torch.zeros(data.shape[1:], dtype=torch.float32, device=results_device)
        # Stock weights tiles with this fp16 Gaussian; use the same values, accumulate in fp32.
        gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10,
                                    device=results_device).float() if self.use_gaussian else None
        data_dev = data.to(self.device) if cuda else data

        def accumulate(group: list[tuple], pred: torch.Tensor) -> None:
            pred = pred.to(results_device)
            for idx, sl in enumerate(group):
                if gaussian is not None:
                    logits[sl] += pred[idx] * gaussian
                    weight[sl[1:]] += gaussian
                else:
                    logits[sl] += pred[idx]
                    weight[sl[1:]] += 1

        if workers > 1:
            saved = torch.get_num_threads()
            try:
                with ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                        initargs=(per_worker,)) as pool:
                    # map() yields in submission order: the accumulation order (hence rounding) is fixed.
                    results = pool.map(lambda g: self._predict_group(net, data_dev, g, combos), groups)
                    for group, pred in zip(groups, results, strict=True):
                        accumulate(group, pred)
            finally:
                torch.set_num_threads(saved)
        else:
            for group in groups:
                accumulate(group, self._predict_group(net, data_dev, group, combos))
        covered = weight > 0
        logits /= torch.where(covered, weight, torch.ones_like(weight))
        if not bool(covered.all()):
            logits[0][~covered] = _SKIPPED_BACKGROUND_LOGIT
        return logits[(slice(None), *revert[1:])]


_MAX_CPU_WORKERS = 4


def _tile_memory_bytes(network: torch.nn.Module, patch: tuple[int, ...]) -> int | None:
    """fp32 working memory of one tile: every feature map of the network.

    Measured on the paper network (1 mm brain, 2 cores): each extra CPU tile worker added 1.63 GiB of
    peak RSS; all feature maps in fp32 are 1.84 GiB. (Half of them, the estimate before issue 20, was
    0.92 GiB: the cap below then let twice the memory it promised.)
    """
    fn = getattr(network, "compute_conv_feature_map_size", None)
    if fn is None:
        return None
    try:
        return int(fn(patch)) * 4
    except Exception:  # architectures without the helper, or with other signatures
        return None


def _cpu_worker_memory_budget() -> float:
    """Bytes the CPU tile workers may hold together: a quarter of the memory we may use, at most 8 GB
    (4 paper-network tiles; the segment node's declared 12 GB holds that, workflows/base.py)."""
    from bids_cl.utils.resources import effective_mem_mb

    mem_mb = effective_mem_mb() or 8192
    return min(8 * 1024 ** 3, mem_mb * 1024 ** 2 / 4)


def make_predictor(model: Any, *, device: torch.device, tta: bool, fast: bool = True,
                   tile_step_size: float = 0.5, compile_network: bool = False,
                   tile_batch_size: int | None = None, precision: str | None = None
                   ) -> tuple[nnUNetPredictor, list[str]]:
    """A predictor initialised with ``model``'s network (weights are loaded per fold by the caller).

    Returns the predictor and warnings (e.g. a trainer class that had to be replaced).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    warnings: list[str] = []
    plans_manager = PlansManager(model.plans)
    configuration_manager = plans_manager.get_configuration(model.configuration_name)
    label_manager = plans_manager.get_label_manager(model.dataset_json)
    trainer_class, warning = model.trainer_class()
    if warning:
        warnings.append(warning)
    with quiet_stdout():
        network = trainer_class.build_network_architecture(
            plans_manager, configuration_manager, 1, label_manager.num_segmentation_heads,
            enable_deep_supervision=False)
    kwargs = dict(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=tta,
                  perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                  verbose_preprocessing=False, allow_tqdm=False)
    if fast:
        predictor: nnUNetPredictor = FastPredictor(compile_network=compile_network,
                                                   tile_batch_size=tile_batch_size, precision=precision,
                                                   **kwargs)
    else:
        with quiet_stdout():
            predictor = nnUNetPredictor(**kwargs)
    with quiet_stdout():
        predictor.manual_initialization(network, plans_manager, configuration_manager, None,
                                        model.dataset_json, model.trainer_name, model.mirror_axes)
    return predictor, warnings


def preprocess(predictor: nnUNetPredictor, array: np.ndarray, spacing: list[float]
               ) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
    """nnU-Net's own preprocessing of one (1, k, j, i) array: (data, nonzero seg, properties)."""
    pp = predictor.configuration_manager.preprocessor_class(verbose=False)
    with quiet_stdout():
        data, seg, props = pp.run_case_npy(array, None, {"spacing": list(spacing)}, predictor.plans_manager,
                                           predictor.configuration_manager, predictor.dataset_json)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), seg, props


@torch.inference_mode()
def fold_logits(predictor: nnUNetPredictor, parameters: list[dict[str, Any]], data: torch.Tensor
                ) -> list[torch.Tensor]:
    """Sliding-window logits of each fold (float32), in the preprocessed grid, left where they were
    computed: on the GPU when the predictor works on the device (the export then runs there too), else
    on the CPU.

    The same loop as ``nnUNetPredictor.predict_logits_from_preprocessed_data`` but keeping each fold's
    logits (for the fold-disagreement uncertainty) instead of only their running sum.
    """
    from torch._dynamo import OptimizedModule

    keep_on = logits_device(predictor)
    out = []
    for params in parameters:
        net = predictor.network
        target = net._orig_mod if isinstance(net, OptimizedModule) else net
        target.load_state_dict(params)
        with quiet_stdout():
            logits = predictor.predict_sliding_window_return_logits(data)
        out.append(logits.to(keep_on, torch.float32))
    return out


def mean_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """The fold ensemble as nnU-Net computes it (a running sum, then one division), without stacking
    every fold into one more copy."""
    if len(logits) == 1:
        return logits[0]
    total = logits[0].clone()
    for more in logits[1:]:
        total += more
    return total / len(logits)


def _lesion_channel(probabilities: Any) -> Any:
    """P(lesion) from nnU-Net's class probabilities: 1 - P(background) when there are several lesion
    classes, else the one lesion class."""
    return 1.0 - probabilities[0] if probabilities.shape[0] > 2 else probabilities[1]


def export_probabilities(predictor: nnUNetPredictor, logits: torch.Tensor, props: dict[str, Any],
                         nthreads: int) -> np.ndarray:
    """nnU-Net's own export (resample to the original shape, softmax, revert cropping): lesion
    probability as float32 in the reader's axis order. Runs on the CPU (nnU-Net resamples in float64)."""
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )

    with quiet_stdout():
        _seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.cpu(), predictor.plans_manager, predictor.configuration_manager, predictor.label_manager,
            props, return_probabilities=True, num_threads_torch=nthreads)
    return np.asarray(_lesion_channel(probs), dtype=np.float32)


def export_resampling(predictor: nnUNetPredictor, props: dict[str, Any], logits_shape: tuple[int, ...]
                      ) -> str:
    """How nnU-Net's export resamples these logits back: ``"none"`` (the grids match), ``"linear"``
    (its default probability resampling, order 1 on all axes together: what ``lesion_probability``
    reproduces) or ``"other"`` (separate-z, another order or a custom function: nnU-Net's own export
    must run)."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        determine_do_sep_z_and_axis,
        resample_data_or_seg_to_shape,
    )

    cm, pm = predictor.configuration_manager, predictor.plans_manager
    target = [int(s) for s in props["shape_after_cropping_and_before_resampling"]]
    if [int(s) for s in logits_shape[1:]] == target:
        return "none"
    fn = cm.resampling_fn_probabilities
    kwargs = dict(getattr(fn, "keywords", {}) or {})
    if getattr(fn, "func", None) is not resample_data_or_seg_to_shape or kwargs.get("is_seg", False) \
            or int(kwargs.get("order", 3)) != 1:
        return "other"
    spacing = [props["spacing"][i] for i in pm.transpose_forward]
    current_spacing = cm.spacing if len(cm.spacing) == len(target) else [spacing[0], *cm.spacing]
    threshold = kwargs.get("separate_z_anisotropy_threshold")
    extra = {} if threshold is None else {"separate_z_anisotropy_threshold": threshold}
    separate_z, _axis = determine_do_sep_z_and_axis(kwargs.get("force_separate_z", False), current_spacing,
                                                    spacing, **extra)
    return "other" if separate_z else "linear"


@torch.inference_mode()
def lesion_probability(predictor: nnUNetPredictor, logits: torch.Tensor, props: dict[str, Any],
                       nthreads: int) -> np.ndarray:
    """The lesion probability of nnU-Net's export, computed where ``logits`` are (GPU or CPU), bringing
    back only the lesion channel of the cropped box.

    Same steps as ``export_probabilities``: order-1 resampling back to the cropped shape (trilinear with
    half-voxel centres and clamped edges: skimage's ``resize(order=1, mode="edge")``, which nnU-Net uses,
    computed in float32 instead of float64), nnU-Net's softmax, the lesion channel, un-cropping (outside the
    box P(lesion) = 0, as nnU-Net's background = 1) and the reverse transpose. Where nnU-Net's export
    resamples otherwise (separate z, another order), its own export runs.
    """
    if export_resampling(predictor, props, tuple(logits.shape)) == "other":
        return export_probabilities(predictor, logits, props, nthreads)
    target = tuple(int(s) for s in props["shape_after_cropping_and_before_resampling"])
    logits = logits.float()
    if tuple(logits.shape[1:]) != target:
        logits = torch.nn.functional.interpolate(logits[None], size=target, mode="trilinear",
                                                 align_corners=False)[0]
    lesion = _lesion_channel(predictor.label_manager.apply_inference_nonlin(logits))
    box = np.zeros([int(s) for s in props["shape_before_cropping"]], dtype=np.float32)
    slices = tuple(slice(int(lo), int(hi)) for lo, hi in props["bbox_used_for_cropping"])
    box[slices] = lesion.to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(box.transpose(predictor.plans_manager.transpose_backward))
