# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates and fills the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

demo: $(STAMP)
	$(BIN)/sparse-rt run digits_cnn --epochs 10
	$(BIN)/sparse-rt run digits_cnn --epochs 10 --budget 4 --codec int8

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
