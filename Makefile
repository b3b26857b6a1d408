# The project's two commands (see README.md). Both create .venv/ on first use: torch is installed
# first and pinned (a plain `pip install torch` would fetch a multi-GB CUDA build), then the project.
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DEMO_OUT ?= output/demo

.PHONY: demo test lint format bench clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	rm -rf $(DEMO_OUT)
	$(BIN)/lsdm-server demo $(DEMO_OUT)

test: lint
	$(BIN)/pytest

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(INSTALLED)
	$(BIN)/python bench/bench_model.py --preset tiny --out bench/results/model_tiny_cpu.md

clean:
	rm -rf $(VENV) output
