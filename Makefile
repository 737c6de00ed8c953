# make env   : create/update .venv and .venv-d2main (idempotent; the first run builds detectron2 and mmcv,
#              later runs take seconds)
# make demo  : the main job on data the project generates (see README); sets up the detectron2 half only
# make test  : the test suite on detectron2 v0.6 (.venv), then its detectron2 side (-m d2) on the second
#              detectron2 line, upstream main (.venv-d2main)
PY := .venv/bin/python
LANE_PY := .venv-d2main/bin/python

.PHONY: env env-d2 demo test
env:
	bash tools/env/setup_env.sh

env-d2:
	RESNEST_ENV=d2 bash tools/env/setup_env.sh

demo: env-d2
	$(PY) tools/demo.py

test: env
	@echo "== tests on detectron2 v0.6 (.venv)"
	$(PY) -m pytest -q tests
	@echo "== detectron2-side tests on detectron2 main (.venv-d2main: sal-detectron2 0.7.2)"
	$(LANE_PY) -m pytest -q -m d2 tests
