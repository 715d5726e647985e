#!/usr/bin/env bash
# Everything the GPU targets need, in one unattended run on a lent GPU machine: the whole seed
# comparison against the eager PyTorch peer (bench_gpu.py, without and with cuDNN autotuning, which
# bench_gpu.py switches on for its own process), then the accuracy evidence for the GPU's defaults
# (bf16, compiled, CUDA graphs) against fp32 training (bench_accuracy.py). DATA must hold
# fashion-mnist/ and mnist/; results go to OUT. Not yet run as a whole: its scripts have each run
# before cnnlab 0.2 (bench_gpu.py on an H200, bench_accuracy.py on the CPU); since their port to
# 0.2's API (engine.build_train_step, peers/torch_peer.py) they have run on the CPU only.
#
#   bash benchmarks/gpu_session.sh DATA OUT
set -euo pipefail
data=${1:?usage: gpu_session.sh DATA OUT}
out=${2:?usage: gpu_session.sh DATA OUT}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# Correctness first (seconds): the learning rate and augmentation really change inside the CUDA graph.
python3 benchmarks/gpu_checks.py --data-dir "$data" 2>&1 | tee "$out/gpu_checks.log" || true
python3 benchmarks/bench_gpu.py --data-dir "$data" --out "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
# The same with cuDNN's autotuning, to decide whether cnnlab should turn it on by default.
python3 benchmarks/bench_gpu.py --data-dir "$data" --out "$out/bench_gpu_cudnn_benchmark.json" --cudnn-benchmark \
    2>&1 | tee "$out/bench_gpu_cudnn_benchmark.log"
# Goal 4's paired equivalence test (margin 0.15 pp), seeds added to unresolved models; cut off after
# 5 minutes so the script ends within 10: every finished run is already in the JSON, and the entry
# is written from it.
timeout 300 python3 benchmarks/bench_accuracy.py --data-dir "$data" --json "$out/accuracy_gpu_mnist.json" \
    --seeds 5 --max-seeds 12 --epochs 4 > /dev/null 2> "$out/accuracy_gpu.log" || true
python3 benchmarks/bench_accuracy.py --from-json "$out/accuracy_gpu_mnist.json" > "$out/accuracy_gpu.md" || true
cat "$out/accuracy_gpu.md"
