"""Shared fixtures: a tiny phantom cache and a tiny Adam pretraining run on it (both made once per session)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # adam.py, data_prep.py, finetune.py, eve.py live at the repo root

# The smallest run that still exercises every piece: two stages (level 0 without pruning, level 2 with
# it), a bank smaller than the number of keys seen so the ring wraps, 32 px views on ResNet-18.
TINY_RUN = ["--data", "phantom", "--arch", "resnet18", "--img-size", "32", "--batch-size", "8",
            "--queue-size", "60", "--levels", "0,2", "--epochs", "1", "--steps-per-epoch", "3",
            "--workers", "0", "--device", "cpu", "--val-steps", "1", "--print-freq", "100", "--seed", "0"]


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    import data_prep
    return Path(data_prep.ensure_phantom(tmp_path_factory.mktemp("phantom") / "phantom",
                                         num_images=48, size=64, seed=0))


@pytest.fixture(scope="session")
def tiny_adam_run(phantom_root, tmp_path_factory):
    import adam
    out = tmp_path_factory.mktemp("adam_run")
    adam.main(TINY_RUN + ["--data-root", str(phantom_root), "--out", str(out)])
    return out
