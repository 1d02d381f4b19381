# Two commands for a fresh machine: `make quickstart` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned only here, for this project's machines (the wheels lie on local disk);
# pyproject keeps a lower bound so users install their own CUDA build.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1

.PHONY: quickstart test venv install install-test bench methods-catalog clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: $(VENV)/.installed
	$(BIN)/python scripts/quickstart.py

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test
	$(BIN)/python scripts/bench_core.py
	$(BIN)/python scripts/bench_methods.py
	$(BIN)/python scripts/bench_switch.py
	$(BIN)/python scripts/bench_dreambooth.py
	$(BIN)/python scripts/bench_cd.py

# after a method or a config field changes (a test says when): the list `visionpeft methods` prints
methods-catalog: $(VENV)/.installed
	$(BIN)/python -c "from visionpeft.cli import write_methods_catalog; write_methods_catalog()"

clean:
	rm -rf $(VENV) build *.egg-info
