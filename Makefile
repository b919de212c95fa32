# The README's two commands: `make demo` and `make test`. Both do all set-up from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint clean

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

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/demo.py --out demo

lint: $(STAMP)
	$(VENV)/bin/ruff check megatron_speech tools tests

clean:
	rm -rf $(VENV) demo runs
