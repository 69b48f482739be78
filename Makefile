# nanopipe: `make test` works from a fresh clone with nothing installed but python3.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest
STAMP   := $(VENV)/.installed

.PHONY: install test test-engine test-arm64 parity-env parity bench-env bench lint golden clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# the whole default suite (parity against transformers lives in `make parity`)
test: install
	$(PYTEST) -q tests --ignore=tests/parity

# the engine alone: what .ci/run also runs under the oldest numpy we support (a Pi's)
ENGINE_TESTS := tests/test_model.py tests/test_fast_decode.py tests/test_weights.py tests/test_decoding.py tests/test_engine.py \
                tests/test_golden.py tests/test_safetensors_io.py
test-engine: install
	$(PYTEST) -q $(ENGINE_TESTS)

# a Raspberry Pi's software, emulated: an arm64 Debian bookworm root under qemu-user (root only; built once
# and cached in /var/cache/nanopipe, or NANOPIPE_ARM64_ROOT), the engine tests in it and an x86 leader with
# arm64 workers (tests/arm64/run.sh says why when it skips)
test-arm64: install
	bash tests/arm64/run.sh

# live comparison against HF transformers, in its own venv so the main one never holds torch
# (pip takes the CPU build of torch 2.13.0 that lies on this machine class's disk)
PARITY_VENV ?= .venv-parity
parity-env:
	test -x $(PARITY_VENV)/bin/python || $(PY) -m venv $(PARITY_VENV)
	$(PARITY_VENV)/bin/python -m pip install -q -r requirements-parity.txt
	$(PARITY_VENV)/bin/python -m pip install -q -e . --no-deps

parity: parity-env
	$(PARITY_VENV)/bin/python -m pytest -q -s tests/parity tests/test_golden.py

# every benchmark (one process vs the memory bound, HF transformers and llama.cpp float32, 3 nodes,
# concurrency, context positions, simulated links, placement, conversations); tables as CSV in
# artifacts/bench. Not part of `make test`.
bench-env: parity-env
	$(PARITY_VENV)/bin/python -m pip install -q -r requirements-bench.txt

bench: bench-env
	$(PARITY_VENV)/bin/python tests/parity/hf_bench.py artifacts/bench

# tensor parallelism alone (also part of `make bench`): one conversation on 1 pinned core vs a split
# stage and a pipeline on 2, gpt2-medium shaped; docs/PERFORMANCE.md, "Tensor parallelism"
.PHONY: bench-tp
bench-tp: install
	$(BIN)/python -m nanopipe.tools.bench_tp artifacts/bench

# llama.cpp's llama-bench, built once from PyPI's llama-cpp-python source into /var/cache/nanopipe/llama.cpp
# (or $NANOPIPE_LLAMA_CPP), ~20 min on 2 cores: `make bench` then adds single-stream decode against it
# (float32, tg128, 1 and 2 threads, side by side) and says so when the build is absent
.PHONY: llama-cpp
llama-cpp: parity-env
	bash tests/parity/build_llama_cpp.sh $(PARITY_VENV)/bin/python

# bounded, derandomized fuzzing of what comes from outside: cluster-port frames (test_fuzz.py), web
# request bodies, safetensors headers and YAML configs (test_fuzz_inputs.py); a few thousand cases,
# the same each run. Both files are also part of `make test`; -s prints the cases run per surface.
.PHONY: fuzz
fuzz: install
	$(PYTEST) -q -s -p no:randomly tests/test_fuzz.py tests/test_fuzz_inputs.py

# the cluster page's screenshots in docs/ (docs/WEB.md shows them), from a real 3-node cluster in Chromium
.PHONY: screenshots
screenshots: install
	NANOPIPE_SCREENSHOTS=docs $(PYTEST) -q -p no:randomly tests/test_browser_cluster.py

lint: install
	$(BIN)/ruff check nanopipe tests

# rebuild the golden files from transformers (needs `make parity`'s packages)
golden: parity-env
	$(PARITY_VENV)/bin/python tests/golden/make_golden.py

clean:
	rm -rf $(VENV) .venv-np124 $(PARITY_VENV) .pytest_cache build *.egg-info
