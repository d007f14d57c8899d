# Quick start: `make demo` (set-up + a first pretraining run on bundled images), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On these machines torch 2.14.1 / torchvision 0.29.1 resolve offline from local disk; on a GPU cluster pick the
# build that matches your CUDA (see README), e.g. make install TORCH="torch==2.14.1 torchvision==0.29.1".
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test test-slurm bench clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# the reference DINOv2 code, for parity tests only (it pins torch 2.0, hence --no-deps; never a dependency)
	$(PY) -m pip install -q --no-deps dinov2==0.0.1.dev2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/prepare_demo_data.py
	$(VENV)/bin/dinospec train --config configs/demo.yaml train.output_dir=runs/demo

test: install
	$(PY) -m pytest -rs $(PYTEST_ARGS)  # -rs: each skipped test says why (SLURM, the DINOv3 reference)

test-slurm: install
	$(PY) -m pytest -m slurm $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
