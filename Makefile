# Two commands do all set-up on a fresh machine:  make demo  and  make test.
# Both install what is missing first (Debian packages as root, .venv, torch, DALI, mpi4py, Horovod).
VENV   ?= .venv
PY     := $(VENV)/bin/python
RANKS  ?= 2
DEMO_DATA := data/demo

.PHONY: install lock demo demo-data lint test paper clean

install: $(VENV)/.installed

$(VENV)/.installed: launch/install.sh launch/constraints.txt setup.cfg pyproject.toml
	bash launch/install.sh $(VENV)
	touch $@

# Regenerate the lock (launch/constraints.txt) from a fresh install of today's newest versions; make
# install then installs through it. On purpose only: commit it with whatever numbers it moves.
lock:
	bash launch/lock.sh

$(DEMO_DATA)/.complete: dali_ba/data/synth.py | install
	rm -rf $(DEMO_DATA)
	$(PY) -m dali_ba.data.synth --out $(DEMO_DATA)
	touch $@

demo-data: $(DEMO_DATA)/.complete

# Horovod over Open MPI's mpirun, which (unlike horovodrun) does not tag every line with its rank:
# rank 0 prints the run, and a message from another rank names its rank itself. With one core per
# rank, MPI waiting by yielding (not spinning) leaves the core to DALI and torch.
MPIRUN_AS_ROOT := $(if $(filter 0,$(shell id -u)),--allow-run-as-root)
demo: install demo-data
	rm -rf runs/demo
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMPI_MCA_mpi_yield_when_idle=1 mpirun -np $(RANKS) $(MPIRUN_AS_ROOT) \
	    --bind-to none --map-by slot python -m dali_ba.train --recipe pipelines/demo.toml $(DEMO_ARGS)

# The paper's Figures 2-5 at small scale (two data sets, 2 seeds): runs/paper/REPORT.md, under 20 min on 2 cores,
# with the machine it ran on, set beside the committed report (another machine's, or this one's: then the
# parameters come out bit for bit the same).
PAPER_COMPARE ?= benchmarks/results/paper/results.json
paper: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dali-ba reproduce --out runs/paper $(if $(PAPER_COMPARE),--compare $(PAPER_COMPARE))

# Style, types and import layers, in seconds, before any test runs (pyproject.toml [tool.ruff] and
# [tool.mypy], setup.cfg [importlinter]; .pre-commit-config.yaml runs the same). `ruff format .` and
# `ruff check --fix .` mend most of what the first two report.
lint: install
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# Two passes at once: the suite on the CPU (test-cpu), on two pytest-xdist workers (one file to a worker,
# in tests/conftest.py's order: the longest first), and beside it the tests marked strict_device (the GPU
# check's test files and its smoke run, tests/test_gpu_check.py) on the strict device mode's stand-in
# device (test-strict-device; dali_ba/strict_device.py: GPU manners on the CPU, host syncs counted). The
# CPU pass prints as it goes; the strict pass's report ($(STRICT_LOG)) follows it. Most tests start
# 2-rank jobs that wait on each other, on files and on timeouts: three streams keep both cores busy
# (docs/measured.md has the times). TEST_WORKERS=0 runs the CPU pass in one process.
TEST_WORKERS ?= 2
STRICT_LOG   ?= runs/test-strict-device.log
PYTEST = PATH="$(CURDIR)/$(VENV)/bin:$$PATH" python -m pytest -q
test: lint
	@mkdir -p $(dir $(STRICT_LOG)); echo "make test: the strict-device pass runs beside the CPU pass; its report follows"
	@$(MAKE) --no-print-directory test-strict-device > $(STRICT_LOG) 2>&1 & strict=$$!; \
	$(MAKE) --no-print-directory test-cpu; cpu=$$?; \
	wait $$strict; strict_rc=$$?; echo "--- the strict-device pass ($(STRICT_LOG))"; cat $(STRICT_LOG); \
	[ $$cpu = 0 ] && [ $$strict_rc = 0 ]

.PHONY: test-cpu test-strict-device
test-cpu: install
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 -m "not strict_device" tests

test-strict-device: install
	$(PYTEST) -p no:xdist --durations=10 --strict-device -m strict_device tests

# The edit loop's tier: the tests that start no process (tests/conftest.py marks the others slow, and
# multinode those on the simulated cluster), in a few minutes; make test still runs everything.
.PHONY: test-fast
test-fast: install
	$(PYTEST) -p no:xdist -m "not slow and not multinode and not strict_device" tests

clean:
	rm -rf runs data .pytest_cache

# The GPU check (benchmarks/gpu_check/): environment, the GPU-relevant tests, the demo trainings, the
# loader against its peers and Figure 5, on a GPU machine in two parts of at most 380 s, one device call
# each (PART=1, then PART=2 on the same machine; WORK keeps part 1's JPEGs for part 2); gpu_check.json,
# .md and details.tar.gz in OUT. SMOKE=1 runs the same steps on the CPU at tiny sizes (tests/test_gpu_check.py, so
# part of make test). Needs no install: the venv's python where there is one, else python3 (GPU machines).
# The GPU machine's torch 2.11 and torchvision 0.26 on this CPU machine (a second virtualenv, about 3 GB
# from the registry, so not part of make test): the GPU check's test files and its smoke run in it.
.PHONY: device-versions
device-versions:
	bash launch/device_versions.sh .venv-device

.PHONY: gpu-check
OUT   ?= runs/gpu-check
SMOKE ?=
PART  ?=
WORK  ?= /tmp/gpu-check-work
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) -m benchmarks.gpu_check --out $(OUT) $(if $(filter-out 0,$(SMOKE)),--smoke) \
		$(if $(PART),--part $(PART) --work $(WORK))
