# make demo: the recipe on the embedded default. make test: the test suite.
# Both create/update .venv by themselves. Without CUDA they pin the CPU torch build.
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
CONSTRAINTS := $(if $(HAS_CUDA),,-c requirements/cpu.txt)
export OMP_NUM_THREADS ?= 2

$(VENV)/.installed: setup.py pyproject.toml requirements/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[test,triton]'
	touch $@

.PHONY: install test demo clean
install: $(VENV)/.installed

# One stdlib corpus build shared by every test process (built on first use).
test: export MINITRON_CACHE ?= $(CURDIR)/.cache
test: $(VENV)/.installed
	$(PY) -m pytest -q -ra --durations=15 tests

# The whole recipe (teacher -> search -> distil -> scratch and CE baselines -> report) into
# runs/recipe; finished stages are reused, an unfinished one resumes. It ends with the table,
# then the JSON summary line. ARGS adds overrides: make demo ARGS=recipe=quick
demo: $(VENV)/.installed
	$(PY) -m minitron_megatron.run $(ARGS)

clean:
	rm -rf runs build *.egg-info
