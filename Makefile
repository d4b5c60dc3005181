# thsrn-workbench: the two-command quick start is `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU build of PyTorch (installed from local wheels where available); GPU users: environment.yml.
TORCH_PIN ?= torch==2.13.0
SCENES_DIR ?= data/scenes
STAMP := $(VENV)/.installed

.PHONY: install demo test report bench lint clean data

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(VENV)/bin/thsrn scenes --preset demo --out $(SCENES_DIR)

demo: $(STAMP)
	$(VENV)/bin/thsrn scenes --preset demo --out $(SCENES_DIR)
	$(VENV)/bin/thsrn train --config configs/scenes_demo_tshsr.yaml --overwrite
	$(VENV)/bin/thsrn train --config configs/scenes_demo_sgr.yaml --overwrite
	$(VENV)/bin/thsrn train --config configs/scenes_demo_saf.yaml --overwrite
	$(VENV)/bin/thsrn eval --checkpoint runs/scenes_demo_tshsr/checkpoint_best.pt --data $(SCENES_DIR)/demo --split test --protocol generic --out runs/eval/tshsr
	$(VENV)/bin/thsrn eval --checkpoint runs/scenes_demo_sgr/checkpoint_best.pt --data $(SCENES_DIR)/demo --split test --protocol generic --out runs/eval/sgr
	$(VENV)/bin/thsrn eval --checkpoint runs/scenes_demo_saf/checkpoint_best.pt --data $(SCENES_DIR)/demo --split test --protocol generic --out runs/eval/saf
	$(VENV)/bin/thsrn eval --checkpoint runs/scenes_demo_sgr/checkpoint_best.pt --checkpoint runs/scenes_demo_saf/checkpoint_best.pt --data $(SCENES_DIR)/demo --split test --protocol generic --out runs/eval/sgraf
	$(VENV)/bin/thsrn report --plan reports/plans/demo.yaml
	@echo "Open reports/demo/index.html"

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
