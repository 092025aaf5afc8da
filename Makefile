# `make test` and `make demo` create .venv when missing and install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch first, pinned: pip takes these builds from the local wheel cache; a bare
# `torch` requirement would pull a multi-GB CUDA build from the index.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Versions known to install and pass together (pip freeze of a green run); without them
# pip's resolver spends minutes backtracking through boto3/aiobotocore releases.
CONSTRAINTS := constraints.txt

.PHONY: test test-unit demo bench clean-venv

# Bytecode: pip would compile all 19,700 installed files one at a time (torch: 17 of its
# 47 s of install here), compileall -j 0 in 24.5 s on 2 cores; the tests import a third of
# that code (by size), and compiling on first import costs them ~15 CPU-s. So nothing is
# compiled at install: the targets below let Python write bytecode as it imports.
#
# Two pips at once: pip unpacks one wheel at a time, and torch's CUDA build (5.5 GB with
# its nvidia wheels) keeps one core busy for ~45 s while the other waits. So torch and
# what it needs (TORCH_CLOSURE: the names torch and torchvision require, to the end; a
# unit test checks them against the installed metadata) install with one pip, and the
# rest of constraints.txt, pinned and without resolving (--no-deps), with another;
# `pip check` then fails on anything missing, and a unit test on a requirement of
# pyproject.toml that constraints.txt does not pin (pin it there). `make .venv/.installed`
# on a fresh clone here: 80 s -> 51 and 57 s, the same packages (pip freeze).
TORCH_CLOSURE := ^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+|setuptools|filelock|typing.extensions|sympy|mpmath|networkx|jinja2|markupsafe|fsspec|numpy|pillow)==
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	grep -viE '$(TORCH_CLOSURE)' $(CONSTRAINTS) > $(VENV)/not-torch.txt
	$(PIP) install -q --no-compile -c $(CONSTRAINTS) $(TORCH) & torch=$$!; \
	$(PIP) install -q --no-compile --no-deps -r $(VENV)/not-torch.txt -e . || { wait $$torch; exit 1; }; \
	wait $$torch
	$(PIP) check
	touch $(STAMP)

# Where PYTHONDONTWRITEBYTECODE is set (as on the CI machines), every process would compile
# what it imports again from source, each Ray worker included (about 1 CPU-s for the repo's
# modules in each inference actor, seconds for torch): these targets let Python write
# bytecode, once.
test test-unit demo: export PYTHONDONTWRITEBYTECODE =

# glibc's malloc returns freed blocks above 128 KiB to the kernel and faults them in again
# on the next allocation: torch's CPU tensors spent about 15 % of the suite's CPU in the
# kernel that way. Keeping freed memory in the process (thresholds of 256/512 MiB) removes
# that; the learning test: 13.9 -> 1.0 s of system time.
test: export MALLOC_MMAP_THRESHOLD_ = 268435456
test: export MALLOC_TRIM_THRESHOLD_ = 536870912
test: export MALLOC_TOP_PAD_ = 268435456
# Two test processes, each with Ray workers, share 2 cores: OpenMP threads that spin while
# they wait for a descheduled sibling burn the other process's core. Passive waiting
# (they sleep): the learning test at 2 torch threads beside one busy core, 586 -> 92 s.
test: export OMP_WAIT_POLICY = PASSIVE

# --durations: every run ends with the slowest tests, so that a slow one is seen early.
# -n 2 --dist loadfile: two test processes, each taking whole files (a file's Ray
# cluster or session is started once); most tests wait on Ray, S3 or a subprocess, so
# two share 2 cores well. --no-loadscope-reorder: files in the order tests/conftest.py
# gives, the slowest first.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

demo: $(STAMP)
	$(VENV)/bin/sempart demo --workdir demo-work

bench: $(STAMP)
	$(PY) benchmarks/latency.py --quick

clean-venv:
	rm -rf $(VENV)
