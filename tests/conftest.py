"""Shared fixtures: a tiny phantom cache and a tiny Adam pretraining run on it (both made once per session)."""
import math
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def one_thread():
    """One torch thread for a test of tiny models: on a shared 2-core box a second thread only contends."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_adam_run(phantom_root, tmp_path_factory):
    import adam
    out = tmp_path_factory.mktemp("adam_run")
    adam.main(TINY_RUN + ["--data-root", str(phantom_root), "--out", str(out)])
    return out


def tc_lse_reference(q, k, bank, temperature, threshold):
    """Per-anchor lse of the CUDA tc kernel's arithmetic, in float64 (test_fused_op.py, test_cuda_emulated.py):
    scores from q and bank rounded to TF32 as cvt.rna.tf32.f32 does (nearest, ties away from zero), the
    positive logit from the unrounded q and k as the merge kernel computes it. threshold None: keep all."""
    def tf32_round(x):
        return ((x.float().contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32).double()
    s = tf32_round(q) @ tf32_round(bank).T
    keep = s < (math.inf if threshold is None else threshold)
    logits = torch.where(keep, s / temperature, torch.tensor(-math.inf, dtype=torch.float64))
    x0 = (q.double() * k.double()).sum(1, keepdim=True) / temperature
    return torch.logsumexp(torch.cat([x0, logits], 1), 1)
