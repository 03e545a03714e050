# make run   - set up .venv and run the main job on the embedded CPU default
# make test  - set up .venv and run the whole test suite (every tier)
# make test-unit | test-distributed | test-system - one tier (tests/README.md)
# make benchmark - the loss and training-step benchmarks (ratios measured in one run)
# make reproduce - the small-scale reproduction of the paper's claim (results/reproduction)
# PYTHON=/path/to/python3.12 picks the interpreter; else python3.12 is searched for.

# PyTorch's CPU allocator hands every large block back to the OS, and the next step pays page
# faults for it again; keeping freed memory in the process makes CPU training ~1.2-1.5x faster.
export MALLOC_MMAP_THRESHOLD_ ?= 17179869184
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184
export MALLOC_TOP_PAD_ ?= 536870912

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON_CANDIDATES := $(PYTHON) python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
	/usr/local/bin/python3.12 /usr/bin/python3.12

.PHONY: run test test-unit test-distributed test-system benchmark reproduce venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@set -e; py=; for p in $(PYTHON_CANDIDATES); do \
	  if $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then py=$$p; break; fi; \
	done; \
	if [ -z "$$py" ]; then echo "Python 3.12 not found (megatron-core 0.19 needs it); set PYTHON=/path/to/python3.12" >&2; exit 1; fi; \
	echo "creating $(VENV) with $$py"; \
	$$py -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node 2 examples/pretrain_gift.py --tensor-model-parallel-size 2

reproduce: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) examples/reproduce/run.py --out results/reproduction

benchmark: $(STAMP)
	$(PY) examples/benchmarks/loss.py
	$(PY) examples/benchmarks/step.py

# The suite runs in pytest-xdist workers, one per core up to 4 (tests/README.md, "Workers");
# TEST_WORKERS=1 runs one.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS)

test: $(STAMP)
	$(PYTEST)

test-unit test-distributed test-system: test-%: $(STAMP)
	$(PYTEST) -m $*
