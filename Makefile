# `make test` and `make demo` create .venv when missing and install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first, pinned: pip takes these builds from the local wheel cache; a bare
# `torch` requirement would pull a multi-GB CUDA build from the index.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: test test-unit demo bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[s3,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

demo: $(STAMP)
	$(VENV)/bin/sempart demo --workdir demo-work

bench: $(STAMP)
	$(PY) benchmarks/latency.py --quick

clean-venv:
	rm -rf $(VENV)
