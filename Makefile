# hybridexit: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
SHARED := ../shared/datasets
DATA   ?= data
CKPT   ?= checkpoints/c10-r32-e20-b1-x20

.PHONY: setup demo test lint data results readme clean edge-aarch64

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[runtime,codecs,dev,onnx,packed,ray]'
	touch $@

setup: $(VENV)/.installed

# CIFAR in the official layout: written from ../shared/datasets when it exists (offline machines);
# otherwise the loader downloads the official archive (with checksum) into the user cache.
data: setup
	@if [ -d $(SHARED) ] && [ ! -f $(DATA)/cifar-10-batches-py/.complete ]; then \
		$(PY) $(SHARED)/materialize.py $(DATA); fi

demo: setup data
	HYBRIDEXIT_DATA=$$( [ -d $(DATA)/cifar-10-batches-py ] && echo $(abspath $(DATA)) ) \
		$(PY) -m hybridexit.cli.demo --checkpoint $(CKPT)

test: setup
	$(PY) -m pytest -q -n 2  # the suite on both cores (pytest-xdist, the dev extra)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# hybridexit-edge (edge/) for aarch64: the cross-compiled wheel (edge/build/arm-check/wheel), its kernels checked
# against x86-64 under qemu-user (scripts/build_edge_aarch64.sh alone builds just the wheel)
edge-aarch64: setup
	scripts/edge_arm_check.sh

readme: setup
	$(PY) scripts/render_readme.py

clean:
	rm -rf $(VENV) .pytest_cache
