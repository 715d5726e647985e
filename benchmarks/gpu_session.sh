#!/usr/bin/env bash
# Everything the GPU goals need, in one unattended run on a lent GPU machine, within 10 minutes
# (each step gets what is left of a 570 s budget, capped; a step cut off keeps what it wrote):
#  1. command to table, cold then warm: `cnnlab compare` (3 models x 12 epochs of Fashion-MNIST,
#     validation every epoch) timed from start to exit and split into phases (bench_command.py,
#     all commands in commands.json), first on the fresh machine, then again
#     (with the caches a second run finds: PyTorch's compiled kernels with --compile on, the page cache);
#     then the same with the units trained together on CUDA streams (`--units-at-once`): the comparison's
#     three models, and 5 seeds of convnet7 against 5 seeds one after another;
#  2. correctness of the CUDA-graph steps (gpu_checks.py: schedules and augmentation inside the graph,
#     the graph's losses against eager's, and where they part);
#  3. the accuracy evidence for the GPU's defaults (bf16, one CUDA graph per step) against fp32 training
#     (bench_accuracy.py, 12 epochs, paired TOST, margin 0.15 pp, seeds added to unresolved models),
#     with all the time left: one process per model, side by side, so that the GPU works for one
#     while another's Python launches kernels (the fp32 reference runs eagerly, each kernel launched
#     from Python: eager PyTorch trained 2.2-2.9x slower than the defaults on the H200).
# With GPU_SESSION_EXTRAS=1, before 3: the bare steps of N seeds and of the 3 models on CUDA streams
# (explore/explore_batched_seeds_gpu.py) and the seed comparison against the eager PyTorch peer
# (bench_gpu.py), both measured on 2026-11-27 (BENCHMARKS.md, "GPU round two"); with CUDNN_BENCH=1 as
# well, bench_gpu.py again with cuDNN's autotuning (more than the 10 minutes with everything else).
# DATA must hold fashion-mnist/ and mnist/. OUT receives at most 8 files (what the device tool
# returns): session.log, commands.json, one accuracy JSON per model, and the extras' JSONs.
#
#   bash benchmarks/gpu_session.sh DATA OUT
#
# Through the device tool, which sends the repository alone: copy ../shared/data to .gpudata, fetch
# the wheel the machine's image lacks (`pip download --no-deps --only-binary=:all: --python-version
# 3.12 --platform manylinux_2_28_x86_64 -d .whl tomli-w==1.2.0`), list both in .git/info/exclude,
# carry them, and run `GPU_SESSION_SECONDS=540 bash benchmarks/gpu_session.sh .gpudata "$OUT"`.
set -uo pipefail
data=$(realpath "${1:?usage: gpu_session.sh DATA OUT}")
out=$(realpath -m "${2:?usage: gpu_session.sh DATA OUT}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/session.log"
budget=${GPU_SESSION_SECONDS:-570}
# step CAP CMD...: run CMD with at most CAP seconds, and never past the budget.
step() {
    local cap=$1 left=$((budget - SECONDS))
    shift
    ((left < cap)) && cap=$left
    if ((cap < 10)); then
        echo "== skipped (budget spent): $*" | tee -a "$log"
        return 0
    fi
    echo "== [$SECONDS s] (max ${cap} s) $*" | tee -a "$log"
    timeout "$cap" "$@" 2>&1 | tee -a "$log"
    echo "== [$SECONDS s] exit ${PIPESTATUS[0]}" | tee -a "$log"
}
# One command line typed by a user (cnnlab COMMAND ARGS on Fashion-MNIST), timed from start to exit
# in a fresh process, with where its time went (startup, data, training, report): bench_command.py.
timed() {
    local label=$1
    shift
    step 120 python3 benchmarks/bench_command.py --repeats 1 --label "$label" --json "$out/commands.json" -- \
        "$@" --dataset fashion-mnist --data-dir "$data"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } 2>&1 | tee -a "$log"
if compgen -G ".whl/*.whl" > /dev/null; then  # packages the machine lacks (tomli-w), carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tee -a "$log"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
timed cold compare
timed warm compare
# Units trained together on CUDA streams (--units-at-once): the comparison's 3 models, and 5 seeds.
timed together compare --units-at-once 3
timed seeds-one-at-a-time train convnet7 --seeds 5
timed seeds-together train convnet7 --seeds 5 --units-at-once 5
step 75 python3 benchmarks/gpu_checks.py --data-dir "$data"
if [[ ${GPU_SESSION_EXTRAS:-0} == 1 ]]; then
    step 60 python3 benchmarks/explore/explore_batched_seeds_gpu.py --seeds 5 --arms one streams \
        --out "$out/batched_seeds_gpu.json"
    step 60 python3 benchmarks/explore/explore_batched_seeds_gpu.py --together convnet3 convnet5 convnet7 \
        --out "$out/models_together_gpu.json"
    step 90 python3 benchmarks/bench_gpu.py --data-dir "$data" --out "$out/bench_gpu.json"
    if [[ ${CUDNN_BENCH:-0} == 1 ]]; then
        step 150 python3 benchmarks/bench_gpu.py --data-dir "$data" --out "$out/bench_gpu_cudnn_benchmark.json" \
            --cudnn-benchmark
    fi
fi
# Accuracy with what is left (25 s kept for the entry): one process per model, side by side; each
# writes its JSON after every run, so a process cut off keeps its finished seeds. At the recipe's 12
# epochs: on the CPU, convnet7's bf16 seeds that were behind after 4 epochs caught up.
models=(convnet3 convnet5 convnet7)
left=$((budget - SECONDS - 25))
if ((left < 60)); then
    echo "== skipped (budget spent): accuracy" | tee -a "$log"
else
    echo "== [$SECONDS s] (max $left s) accuracy, one process per model: ${models[*]}" | tee -a "$log"
    for model in "${models[@]}"; do
        timeout "$left" python3 benchmarks/bench_accuracy.py --data-dir "$data" --models "$model" \
            --json "$out/accuracy_gpu_$model.json" --seeds 5 --max-seeds 24 --epochs 12 2>&1 |
            sed -u "s/^/[$model] /" >> "$log" &
    done
    wait
    rm -f "$out"/*.tmp  # a JSON being replaced when its process was cut off
    echo "== [$SECONDS s] accuracy done" | tee -a "$log"
fi
jsons=()
for model in "${models[@]}"; do [[ -s $out/accuracy_gpu_$model.json ]] && jsons+=("$out/accuracy_gpu_$model.json"); done
if ((${#jsons[@]})); then
    budget=$((budget + 25)) step 25 python3 benchmarks/bench_accuracy.py --from-json "${jsons[@]}"
fi
echo "== done in $SECONDS s" | tee -a "$log"
