# thsrn-workbench: the two-command quick start is `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU build of PyTorch (installed from local wheels where available); GPU users: environment.yml.
TORCH_PIN ?= torch==2.13.0
SCENES_DIR ?= data/scenes
STAMP := $(VENV)/.installed
# bash with pipefail: a failing command piped into `sed` (the demo's line prefixes) still fails the target.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: install demo test report bench lint clean data demo-train-tshsr demo-train-sgraf demo-eval-tshsr demo-eval-sgraf

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(VENV)/bin/thsrn scenes --preset demo --out $(SCENES_DIR)

# `make demo` uses both cores of a small machine: two trainings (one torch thread each) and then two
# evaluations run side by side, their output lines prefixed with the model; the report runs two
# notebooks at a time. Everything is recomputed on every run (train --overwrite).
demo: $(STAMP)
	$(VENV)/bin/thsrn scenes --preset demo --out $(SCENES_DIR)
	@echo "== training TSHSR || SGR, then SAF (2 epochs each on Scenes demo)"
	@$(MAKE) --no-print-directory -j2 demo-train-tshsr demo-train-sgraf
	@echo "== evaluating on the Scenes demo test split: TSHSR || SGR, SAF, SGRAF (SGR + SAF)"
	@$(MAKE) --no-print-directory -j2 --output-sync=target demo-eval-tshsr demo-eval-sgraf
	$(VENV)/bin/thsrn report --plan reports/plans/demo.yaml --jobs 2
	@echo "Open reports/demo/index.html"

# The steps of `make demo` (they assume its data and, for the evaluations, its checkpoints).
TRAIN = $(VENV)/bin/thsrn train --overwrite --no-progress --config
EVAL = OMP_NUM_THREADS=1 $(VENV)/bin/thsrn eval --no-progress --data $(SCENES_DIR)/demo --split test --protocol generic
demo-train-tshsr:
	$(TRAIN) configs/scenes_demo_tshsr.yaml 2>&1 | sed -u 's/^/[tshsr] /'
demo-train-sgraf:
	$(TRAIN) configs/scenes_demo_sgr.yaml 2>&1 | sed -u 's/^/[sgr] /'
	$(TRAIN) configs/scenes_demo_saf.yaml 2>&1 | sed -u 's/^/[saf] /'
demo-eval-tshsr:
	$(EVAL) --checkpoint runs/scenes_demo_tshsr --out runs/eval/tshsr
demo-eval-sgraf:
	$(EVAL) --checkpoint runs/scenes_demo_sgr --out runs/eval/sgr
	$(EVAL) --checkpoint runs/scenes_demo_saf --out runs/eval/saf
	$(EVAL) --checkpoint runs/scenes_demo_sgr --checkpoint runs/scenes_demo_saf --out runs/eval/sgraf

report: $(STAMP)
	$(VENV)/bin/thsrn report --plan reports/plans/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs reports/demo reports/smoke
