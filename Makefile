# make run   - set up .venv and run the main job on the embedded CPU default
# make test  - set up .venv and run the whole test suite
# make benchmark - the loss benchmark (ratios against Megatron's cross-entropy)
# PYTHON=/path/to/python3.12 picks the interpreter; else python3.12 is searched for.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON_CANDIDATES := $(PYTHON) python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
	/usr/local/bin/python3.12 /usr/bin/python3.12

.PHONY: run test benchmark venv

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
	$(PY) examples/benchmarks/loss.py

benchmark: $(STAMP)
	$(PY) examples/benchmarks/loss.py

test: $(STAMP)
	$(PY) -m pytest
