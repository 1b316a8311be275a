#!/usr/bin/env bash
# The prepared GPU check, for a session whose task is lent a GPU machine (the device tool). One call, ≤ 9 minutes:
#
#   here:   ../shared/device/fetch-wheels.sh .wheels          # trl, datasets, wandb, gguf, ... (the GPU image lacks them)
#           echo /.wheels/ >> .git/info/exclude
#   device: run(command="bash scripts/device_bench.sh", carry=[".wheels"], timeout_s=600)
#
# It writes JSON (and the logs) under $OUT: the CUDA-only tests, the rollout benchmark on CUDA at batch 1-64 with
# sampling at T = 1 (tiny models: the embedded model's 94 MB GGUF does not fit one call's 64 MiB carry), and, where
# vLLM is importable there, vLLM plain vs vLLM + the truncated drafter vs vLLM + the EAGLE head at T = 1. NOT yet run on a GPU (no task has been lent
# one): the first run may need a fix; its log says where.
set -uo pipefail
OUT=${OUT:-outputs/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline TRL_EXPERIMENTAL_SILENCE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ -d .wheels ]; then
  python3 -m pip install -q --no-index --find-links .wheels trl datasets wandb gguf 2>&1 | tail -3
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3

# Lossless in low precision on CUDA (the near-tie test), and everything else marked gpu.
timeout 150 python3 -m pytest -m gpu -q tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -5

# The engine on CUDA: plain generate vs fixed k vs elastic, batch 1-64, T = 1, with controlled drafter agreement.
timeout 180 python3 scripts/bench_rollout.py --model tiny --device cuda --batch-sizes 1,4,16,64 --max-new-tokens 128 \
  --repeats 3 --do-sample --temperature 1.0 --json "$OUT/bench_rollout_cuda.json" 2>&1 | tee "$OUT/bench_rollout.log" | tail -12

# The EAGLE-style head's draft step on CUDA (c = a head step / a policy decode step; an untrained head on the tiny
# policy, so its acceptance means nothing here, its costs do).
timeout 60 python3 scripts/bench_rollout.py --model tiny --drafter-kind eagle --device cuda --batch-sizes 1,16 \
  --max-new-tokens 64 --repeats 2 --do-sample --temperature 1.0 --json "$OUT/bench_rollout_eagle_cuda.json" 2>&1 \
  | tee "$OUT/bench_rollout_eagle.log" | tail -6

if python3 -c "import vllm; from adaptive_drafter.embedded import gguf_path; gguf_path()" 2>/dev/null; then
  # vLLM plain vs the truncated drafter (draft_model) vs the shipped EAGLE head (eagle3, vLLM's GPU kernels), T = 1.
  timeout 200 python3 scripts/bench_vllm.py --batch-sizes 1,8,32,64 --max-new-tokens 128 --repeats 3 --do-sample \
    --skip-hf --methods draft_model,eagle3 --head drafters/smollm2-135m-eagle3-4k \
    --json "$OUT/bench_vllm_cuda.json" 2>&1 | tee "$OUT/bench_vllm.log" | tail -8
else
  echo "vLLM or the embedded model is not on this machine (each exceeds one call's carry): vLLM rows not measured" | tee "$OUT/bench_vllm.log"
fi
