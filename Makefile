VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo demo-sd demo-imagen demo-two-objects setup lint bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch lies on local disk; pin it first so nothing pulls the CUDA build.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/t2i demo --out runs/demo

demo-imagen: $(STAMP)
	$(VENV)/bin/t2i demo --family imagen --out runs/demo-imagen

demo-sd: $(STAMP)
	$(VENV)/bin/t2i demo --family sd --out runs/demo-sd

demo-two-objects: $(STAMP)
	$(VENV)/bin/t2i demo --task two-objects --out runs/demo-two-objects

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
