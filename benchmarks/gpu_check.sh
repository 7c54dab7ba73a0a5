#!/usr/bin/env bash
# The GPU figures of issue 20 in one prepared run (about 10 minutes on an H100/H200 with 16 cores).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Needs bids_cl's dependencies importable by python3 (a venv from scripts/install.sh, or wheels on
# PYTHONPATH on a machine that has only torch) and a CUDA GPU. It prints, in order:
#   1. the CUDA tests: the engine's export on the GPU equals the CPU's; fold logits stay on the device;
#      the final mask agrees with stock nnU-Net on the GPU; the shared segmentation worker, forked after the
#      runner's device check, segments on the GPU (tests/test_engine_export.py, test_engine_fast.py,
#      test_worker.py);
#   2. the sliding window and end to end against stock nnUNetPredictor: paper-sized 5-fold model, TTA,
#      1 mm brain, eager and torch.compile (benchmarks/inference.py);
#      and the engine's export with the logits on the GPU against nnU-Net's (benchmarks/export.py);
#   3. the whole participant against the stock chain on the GPU, paper-sized model (benchmarks/participant.py;
#      targets: <= 20 s, segmentation stage >= 3x stock, mask disagreement <= 1e-4);
#   4. 8 participants together against one at a time (benchmarks/throughput.py): the GPU overlapping the
#      CPU stages of other participants, with the shared worker (the GPU default) and with a model per node.
# Each step's figures are also written as JSON under OUT_DIR (default: $OUT if set, else ./gpu_check).
set -uo pipefail
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
"$py" - 2>/dev/null <<'PY' || { echo "gpu_check: $py has no torch that sees a CUDA GPU" >&2; exit 69; }
import torch
assert torch.cuda.is_available()
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CPUs", len(__import__("os").sched_getaffinity(0)))
PY
status=0
step() { echo; echo "=== $1"; shift; "$@" || { echo "step failed: exit $?"; status=1; }; }
step "1. CUDA tests" "$py" -m pytest -q -p no:cacheprovider tests/test_engine_export.py tests/test_engine_fast.py tests/test_worker.py
step "2a. sliding window, paper net, 5 folds, TTA, eager" \
    "$py" benchmarks/inference.py --network paper --volume brain --device cuda --folds 5 --tta --repeats 3 --end-to-end \
    --json "$out/inference_eager.json"
step "2b. the same, torch.compile" \
    "$py" benchmarks/inference.py --network paper --volume brain --device cuda --folds 5 --tta --repeats 3 --compile --end-to-end \
    --json "$out/inference_compiled.json"
step "2c. the export on the GPU against nnU-Net's (CPU) export" \
    "$py" benchmarks/export.py --device cuda --threads 16
step "3. whole participant, paper-sized model, GPU" \
    "$py" benchmarks/participant.py --model paper --device cuda --repeats 2 --root "$out/participant" \
    --json "$out/participant.json"
step "4. 8 participants together vs one at a time" \
    "$py" benchmarks/throughput.py --participants 8 --model paper --device cuda --root "$out/throughput" \
    --json "$out/throughput.json"
rm -rf "$out/participant" "$out/throughput"  # phantoms and work folders: only the figures come back
exit $status
