# make demo: synthetic dataset + one fold on a local Ray. make test: the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/synthetic
DEMO_OUT ?= outputs/demo

.PHONY: setup demo test lint benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml configs/cluster-lock.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' -c configs/cluster-lock.txt  # the versions the cluster installs
	touch $(STAMP)

demo: setup
	test -f $(DEMO_DATA)/train.pq || $(BIN)/gunsound synth $(DEMO_DATA) --clips-per-class 60 --background 180 --seed 0
	$(BIN)/python -m ray_jobs.train configs/laptop.yaml --data $(DEMO_DATA) --output $(DEMO_OUT)
	@echo "demo outputs are in $(DEMO_OUT)/ (config.yaml, metrics.json, fold_0/model.pt)"

test: setup
	$(BIN)/ruff check gunsound ray_jobs tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check gunsound ray_jobs tests benchmarks

benchmark: setup
	$(BIN)/python benchmarks/features_ray_vs_loop.py

clean:
	rm -rf $(VENV) outputs data .pytest_cache
