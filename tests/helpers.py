"""What several test files share, in one place: the tiny pretraining run's flags, a fake ChestX-ray14 download, the
loss's test inputs and the tc kernel's arithmetic. Fixtures live in conftest.py; test files import only this."""
import csv
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# The smallest run that still exercises every piece: two stages (level 0 without pruning, level 2 with
# it), a bank smaller than the number of keys seen so the ring wraps, 32 px views on ResNet-18.
TINY_RUN = ["--data", "phantom", "--arch", "resnet18", "--img-size", "32", "--batch-size", "8",
            "--queue-size", "60", "--levels", "0,2", "--epochs", "1", "--steps-per-epoch", "3",
            "--workers", "0", "--device", "cpu", "--val-steps", "1", "--print-freq", "100", "--seed", "0"]


def train_tiny(phantom_root, out, *extra):
    """adam.main on the tiny phantom with TINY_RUN and extra flags (later flags win); returns its summary."""
    import adam
    return adam.main(TINY_RUN + ["--data-root", str(phantom_root), "--out", str(out), *extra])


# ----------------------------------------------------------------------------------------------------
# The loss

def loss_inputs(B, D, K, planted=0, noise=0.02, seed=0, spread=False):
    """Unit-norm q, k (B x D) and bank (K x D), float64. k is q plus noise; the bank is random (cosine ~N(0, 1/D)
    to any q, kept at t = 0.8) but for `planted` rows, near-copies of q_0, q_1, ... (cosine ~0.97 at noise 0.02
    and D = 128, pruned at t = 0.8): the first rows, or with spread rows drawn at random (over tiles and splits)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    if planted:
        rows = torch.randperm(K, generator=g)[:planted] if spread else torch.arange(planted)
        near = q[torch.arange(planted) % B] + noise * torch.randn(planted, D, generator=g, dtype=torch.float64)
        bank[rows] = F.normalize(near, dim=1)
    return q, k, bank


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


# ----------------------------------------------------------------------------------------------------
# A fake ChestX-ray14 download

CXR14_SIDE = 40  # fake ChestX-ray14 images are 40x40


def cxr14_records():
    """(name, patient, labels) for 14 patients with 1-4 images each; deterministic."""
    import data_prep
    rng = np.random.default_rng(1)
    recs = []
    for p in range(1, 15):
        for k in range(int(rng.integers(1, 5))):
            labs = sorted(set(rng.choice(data_prep.CXR14_LABELS, int(rng.integers(0, 3)), replace=False)))
            recs.append((f"{p:08d}_{k:03d}.png", f"{p}", labs))
    return recs


def make_cxr14(root, layout):
    """Write a fake ChestX-ray14 tree. Patients 1-4 are the test list. Every 4th image is RGBA (R=G=B, random
    alpha), one image is a truncated PNG, one image file (listed) is missing from the CSV."""
    root.mkdir(parents=True)
    recs = cxr14_records()
    rng = np.random.default_rng(2)
    files = {}
    for j, (name, _, _) in enumerate(recs):
        g = rng.integers(0, 256, (CXR14_SIDE, CXR14_SIDE), dtype=np.uint8)
        if j % 4 == 1:
            im = Image.fromarray(np.stack([g, g, g, rng.integers(0, 256, g.shape, dtype=np.uint8)], -1), "RGBA")
        else:
            im = Image.fromarray(g, "L")
        buf = io.BytesIO()
        im.save(buf, "PNG")
        files[name] = buf.getvalue()
    truncated, not_in_csv = recs[5][0], recs[9][0]
    files[truncated] = files[truncated][: len(files[truncated]) // 2]
    names = sorted(files)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    if layout == "flat":
        (root / "images").mkdir()
        for n, b in files.items():
            (root / "images" / n).write_bytes(b)
    elif layout == "nested":
        for a, half in enumerate(halves, 1):
            d = root / f"images_{a:03d}" / "images"
            d.mkdir(parents=True)
            for n in half:
                (d / n).write_bytes(files[n])
    else:                                           # the published .tar.gz archives, left packed
        for a, half in enumerate(halves, 1):
            with tarfile.open(root / f"images_{a:03d}.tar.gz", "w:gz") as tf:
                for n in half:
                    info = tarfile.TarInfo(f"images/{n}")
                    info.size = len(files[n])
                    tf.addfile(info, io.BytesIO(files[n]))
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                    "Patient Gender", "View Position", "OriginalImage[Width", "Height]"])
        for name, pid, labs in recs:
            if name != not_in_csv:
                w.writerow([name, "|".join(labs) or "No Finding", 0, pid, 50, "M", "PA", 1024, 1024])
    test = [n for n, p, _ in recs if int(p) <= 4]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(n for n, _, _ in recs if n not in test) + "\n")
    return dict(root=root, recs=recs, files=files, truncated=truncated, not_in_csv=not_in_csv, test=set(test))
