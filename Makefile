# One entry point: `make demo` (CPU demo on phantoms, about 4 minutes on 2 cores, README) and `make test` (the test suite).
# Both create .venv and install everything on first use, including the fused op (adam_ext), built with its
# CUDA kernels when a CUDA toolkit is found (setup.py looks at CUDA_HOME, then nvcc on PATH).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench gpu-wheels clean

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

# The packages the GPU machine's image lacks for the full suite (gpu_check.sh installs .whl/ there;
# the device call carries it: carry [".whl"]). About 37 MB, pure-Python wheels.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform any -d .whl segmentation-models-pytorch==0.6.0 pydicom==3.0.2 pydicom-data==1.0.0

clean:
	rm -rf build *.egg-info adam_ext/*.so runs
