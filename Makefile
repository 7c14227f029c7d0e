# make test : create .venv, install the project with its test extras, lint, run the tests
# make demo : the end-to-end demo (shards from real emoji data -> 2-process DDP training -> evaluation)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds this platform serves from disk
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test lint demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]' $(TORCH)
	touch $@

lint: venv
	$(VENV)/bin/ruff check diffclip training eval bench tests

test: lint
	$(PY) -m pytest -q tests

demo: venv
	scripts/demo.sh

bench: venv
	$(PY) bench/attention.py

clean:
	rm -rf $(VENV) build *.egg-info
