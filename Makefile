# difflm: the two commands of the README.
#   make quickstart   install, then run the quickstart sweep (4 tiny MDLMs, one per noise
#                     schedule, 2 training seeds each, ASHA, built-in corpus; ~100 s on 2 CPU cores)
#   make test         install, then run the whole test suite
# GPU users: make quickstart TORCH_INDEX=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.difflm-installed

.PHONY: install quickstart test gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel here, or a CUDA build from TORCH_INDEX.
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/difflm sweep sweeps/quickstart.yaml --name quickstart-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -q tests

# On a lent GPU: doctor, train (1 and 2 workers), bench, sampling, a 2-trial sweep; report in
# $$DIFFLM_GPU_REPORT_DIR or gpu-report/ (< 8 min on one H100). Without CUDA: one line, exit 0.
gpu-check: $(STAMP)
	$(VENV)/bin/difflm bench gpu

clean:
	rm -rf $(VENV) runs .difflm_cache
