# One entry point: `make demo` (CPU demo on phantoms, about 7 minutes on 2 cores, README) and `make test` (the test suite;
# `make test-fast` for the fast tier).
# Both create .venv and install everything on first use, including the fused op (adam_ext), built with its
# CUDA kernels when a CUDA toolkit is found (setup.py looks at CUDA_HOME, then nvcc on PATH), and the optional
# [baselines] extra (lightly, pinned in pyproject.toml and requirements.txt), so that the tests cover baselines.py.
# The default installs the tested pin of requirements.txt (torch 2.14.1, CUDA 13 wheels). To keep a torch you already
# have (another CUDA build, a cluster module, conda), pass SYSTEM_TORCH=1 and the Python that has it:
#     make test SYSTEM_TORCH=1 PYTHON=/path/to/python-with-torch
# The venv then sees that Python's packages (--system-site-packages), requirements.txt is installed without its
# torch / torchvision lines, the project with --no-deps, and the op is compiled against your torch. Delete .venv
# when you switch between the two. pyproject.toml gives the torch versions this has been run with.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SYSTEM_TORCH ?=
ifeq ($(SYSTEM_TORCH),1)
VENV_FLAGS  := --system-site-packages
REQS        := $(VENV)/requirements-without-torch.txt
DEPS_FLAG   := --no-deps
else
VENV_FLAGS  :=
REQS        := requirements.txt
DEPS_FLAG   :=
endif

.PHONY: install demo test test-fast test-learning bench gpu-wheels clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py pyproject.toml $(wildcard csrc/*) $(wildcard adam_ext/*.py)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
ifeq ($(SYSTEM_TORCH),1)
	@$(BIN)/python -c "import torch, torchvision; print('SYSTEM_TORCH=1: torch', torch.__version__, 'torchvision', \
		torchvision.__version__, 'from', torch.__file__)" || { echo "SYSTEM_TORCH=1: $(BIN)/python sees no torch \
		and torchvision: pass PYTHON=<the python that has them>, and delete $(VENV) if it was made without them"; exit 1; }
	grep -vE '^(torch|torchvision)==' requirements.txt > $(REQS)
endif
	$(BIN)/pip install -q -r $(REQS)
	$(BIN)/pip install -q --no-build-isolation $(DEPS_FLAG) -e ".[baselines]"
	touch $@

# Pretrain on phantoms (generated on first use), then measure what the embedding learned against random init.
demo: $(STAMP)
	$(BIN)/python adam.py --out runs/demo --overwrite
	rm -rf runs/demo/eve  # measurements of the encoder just replaced
	$(BIN)/python eve.py --data phantom --arch resnet18 --img-size 64 --what locality,compositionality,frozen \
		--draws 3 --init adam:runs/demo --init random --compare --out runs/demo/eve

# test: every test (CI runs this). test-fast: the tests not marked slow or cuda (pyproject.toml), meant to take under
# 2 minutes on 2 cores and to touch every module: the loop while editing (docs/testing.md).
test: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not learning"

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow and not cuda and not learning"

test-learning: $(STAMP)
	$(BIN)/python -m pytest tests -q -m learning

bench: $(STAMP)
	$(BIN)/python bench.py

# The packages the GPU machine's image lacks for the full suite (gpu_check.sh installs .whl/ there;
# the device call carries it: carry [".whl"]). About 37 MB, pure-Python wheels.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform any -d .whl segmentation-models-pytorch==0.6.0 pydicom==3.0.2 pydicom-data==1.0.0 tqdm==4.70.1

clean:
	rm -rf build *.egg-info adam_ext/*.so runs
