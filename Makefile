# make env   : create/update .venv (idempotent; first run builds detectron2 and mmcv, later runs take seconds)
# make demo  : the main job on data the project generates (see README)
# make test  : the test suite
PY := .venv/bin/python

.PHONY: env demo test
env:
	bash tools/env/setup_env.sh

demo: env
	$(PY) tools/demo.py

test: env
	$(PY) -m pytest -q tests
