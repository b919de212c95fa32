# The README's commands: `make demo`, `make test` (all tests; what CI runs) and `make test-fast` (the unit tests).
# All do the set-up from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup sysdeps test test-fast demo demo-all lint clean

setup: $(STAMP)

# torch first: the CPU build unless a CUDA torch is already importable (NVIDIA's container).
# Never `pip install apex` (an unrelated PyPI web toolkit) nor transformer-engine on CPU machines.
$(STAMP): pyproject.toml
	if $(PYTHON) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "CUDA torch present: reusing it"; test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PY) -m pip install -q "torch==2.13.0"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Debian packages the demo corpus (speech engines) and the real-Slurm test stage need (root + apt; elsewhere a
# notice, and those tests skip unless CI is set).
SYSDEPS := espeak-ng flite sox slurmctld slurmd slurm-client munge shellcheck
SYSDEPS_OPTIONAL := asterisk-core-sounds-en-wav asterisk-core-sounds-ru-wav asterisk-core-sounds-it-wav \
	asterisk-core-sounds-en asterisk-moh-opsound-wav
sysdeps:
	@if command -v espeak-ng >/dev/null && command -v flite >/dev/null && command -v sox >/dev/null && \
		command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v shellcheck >/dev/null; then \
		echo "system packages present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSDEPS) >/dev/null && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS_OPTIONAL) >/dev/null || \
		 echo "optional recorded prompts not installed: the demo corpus uses synthetic speech only"); \
	else \
		echo "missing Debian packages; run as root: apt-get install $(SYSDEPS) $(SYSDEPS_OPTIONAL)"; \
	fi

# pytest-xdist: TEST_WORKERS processes (a fixed 2, not `auto`: a CPU quota is not what the process sees); a module
# with a module-scoped fixture stays on one worker (tests/conftest.py). The 20 slowest tests are listed at the end.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP) sysdeps
	$(PYTEST) --durations=20 tests

# tests/unit only: in-process tests and single tool runs, a few minutes on 2 cores
test-fast: $(STAMP) sysdeps
	$(PYTEST) tests/unit

demo: $(STAMP) sysdeps
	OMP_NUM_THREADS=1 $(PY) tools/demo.py --out demo

# all four fine-tuning tasks, each from the pre-trained and from an untrained encoder (README "Demo results")
demo-all: $(STAMP) sysdeps
	OMP_NUM_THREADS=1 $(PY) tools/demo.py --out demo --all

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_speech tools tests bench

clean:
	rm -rf $(VENV) demo runs
