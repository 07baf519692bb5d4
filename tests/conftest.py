"""Shared fixtures: a tiny phantom cache and a tiny Adam pretraining run on it (both made once per session), and
one torch thread for tiny workloads. Shared functions and constants are in helpers.py."""
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, train_tiny

sys.path.insert(0, str(ROOT))  # adam.py, data_prep.py, finetune.py, eve.py live at the repo root


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    import data_prep
    return Path(data_prep.ensure_phantom(tmp_path_factory.mktemp("phantom") / "phantom",
                                         num_images=48, size=64, seed=0))


@pytest.fixture(scope="session")
def tiny_adam_run(phantom_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("adam_run")
    train_tiny(phantom_root, out)
    return out


@pytest.fixture
def one_thread():
    """The workloads here are tiny: on a small shared CPU two OpenMP threads can stall each other many times over
    the work itself; one thread does not."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
