# One entry point: `make demo` (CPU demo on phantoms, ~N min on 2 cores) and `make test` (the test suite).
# Both create .venv and install everything on first use, including the fused op (adam_ext), built with its
# CUDA kernels when a CUDA toolkit is found (setup.py looks at CUDA_HOME, then nvcc on PATH).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py $(wildcard csrc/*) $(wildcard adam_ext/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

# Pretrain on phantoms (generated on first use), then measure what the embedding learned against random init.
demo: $(STAMP)
	$(BIN)/python adam.py --out runs/demo
	$(BIN)/python eve.py --data phantom --arch resnet18 --img-size 64 --what locality,compositionality \
		--init adam:runs/demo --init random --compare --out runs/demo/eve

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)
	$(BIN)/python bench.py

clean:
	rm -rf build *.egg-info adam_ext/*.so runs
