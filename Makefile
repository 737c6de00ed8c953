# make env      : create/update .venv and .venv-d2main (idempotent; the first run builds detectron2 and mmcv,
#                 later runs take seconds)
# make demo     : the main job on data the project generates (see README); sets up the detectron2 half only
# make test     : the default test tier (-m "not slow"): what a contributor runs after a change
# make test-all : the full suite (what CI runs): every test with every part required, then the detectron2
#                 tests (-m d2) again on the second detectron2 line, upstream main (.venv-d2main)
PY := .venv/bin/python
LANE_PY := .venv-d2main/bin/python
FULL := RESNEST_TEST_REQUIRE_ALL=1
TIMEOUT := --timeout=900
# pytest-xdist workers, one file per worker at a time (module fixtures built once); each worker's torch uses its
# share of the cores (tests/conftest.py). JOBS=1 runs in one process.
JOBS ?= 2
XDIST := $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile)

.PHONY: env env-d2 demo test test-all
env:
	bash tools/env/setup_env.sh

env-d2:
	RESNEST_ENV=d2 bash tools/env/setup_env.sh

demo: env-d2
	$(PY) tools/demo.py

test: env
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(TIMEOUT) tests

test-all: env
	@echo "== all tests on detectron2 v0.6 (.venv)"
	$(FULL) $(PY) -m pytest -q $(XDIST) --durations=25 $(TIMEOUT) tests
	@echo "== detectron2 tests on detectron2 main (.venv-d2main: sal-detectron2 0.7.2)"
	$(FULL) $(LANE_PY) -m pytest -q $(XDIST) -m d2 --durations=10 $(TIMEOUT) tests
