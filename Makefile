# The README's two commands: `make demo` and `make test`. Both create the virtual
# environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
PYTEST_ARGS ?=
# pytest-xdist processes for `make test` and `make test-fast` (0: the whole suite in one
# process). A worker takes whole test files, the files that share a session fixture together,
# the long end-to-end files first (tests/conftest.py).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: venv test test-fast demo theta0 bench clean

venv: $(VENV)/.installed

# setup.py compiles the C merge passes (optional: without a compiler TIES and Fisher run NumPy).
$(VENV)/.installed: pyproject.toml setup.py pipeline/methods/_passes.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

## test: set up the environment and run the whole test suite (slow tests included); with
## EPIMER_SLURM_TESTS=1 (as root with apt-get) tests/slurm also installs and starts a throw-away
## single-node Slurm for its tests
test: venv
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

## test-fast: the suite without the tests marked slow
test-fast: venv
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

## demo: set up the environment and run the built-in benchmark end to end
demo: venv
	$(VENV)/bin/snakemake --cores $(CORES)
	$(VENV)/bin/snakemake --cores $(CORES) --report results/demo/report.html
	$(PY) -m pipeline show results/demo/summary.csv
	@echo; cat results/demo/tables/normalised.md
	@echo; echo "Report: results/demo/report.html (every table and figure; docs/demo.md says what the demo shows)"

## theta0: pretrain the demo's shipped θ0 again from its recorded recipe (minutes) and check
## that the result is pipeline/data/files/demo-theta0.safetensors, bit for bit
theta0: venv
	$(PY) -m pipeline pretrain --regenerate-shipped --out results/theta0-regenerated.safetensors

## bench: merge and Fisher benchmarks at real scale (tables on stdout, CSV in benchmarks/out/)
bench: venv
	$(PY) benchmarks/merge.py
	$(PY) benchmarks/fisher.py

clean:
	rm -rf $(VENV) .snakemake results
