"""
Adam: autodidactic dense anatomical models, the whole pretraining method in one file.

    Hosseinzadeh Taher, Gotway, Liang. "Towards Foundation Models Learned from Anatomy in Medical
    Imaging via Self-Supervision". MICCAI 2023 DART (arXiv 2309.15358).

Reading order (the order of the paper, Sect. 2 and Fig. 2):
  1. configuration          argparse; defaults = the paper's and the authors' release (METHOD.md §3-5)
  2. Anatomy Decomposer     anatomy_parts(): level n -> 2^n boxes that tile the image
  3. views                  two augmented views of one random part per image
  4. encoder + head         student f_theta, h_theta; teacher f_xi, h_xi = EMA of the student
  5. memory bank            K x D ring buffer of the teacher's keys (the negatives)
  6. Purposive Pruner + InfoNCE   info_nce(): drop bank entries too similar to the anchor, then contrast
  7. coarse-to-fine stages  one stage per level (0 -> 2 -> 4), each starting from the previous one
  8. training loop, checkpoints, __main__

`python adam.py` runs the CPU demo on procedurally generated chest phantoms (preset "demo");
`python adam.py --data chestxray14` runs the paper's recipe (preset "paper"); `torchrun` runs it on
many GPUs (or CPU processes with gloo). See README.md.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

# OpenMP threads that spin while they wait steal the cores from DataLoader workers and other processes: on the
# 2-core CPU box the fused loss fell from 116 ms to ~2.5 s per call under load (BENCHMARKS.md). Sleeping waits
# cost nothing measurable here. Must be set before torch loads libgomp; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2 as T

# -----------------------------------------------------------------------------
# 1. Configuration. Flags left at None take their value from the preset: "paper" reproduces the
# authors' settings (METHOD.md §3-5), "demo" is a CPU-sized run of the same method.

PRESETS = {
    "paper": dict(arch="resnet50", img_size=224, batch_size=256, queue_size=65536, epochs=200, lr=0.03,
                  steps_per_epoch=None, momentum_ema=0.999, workers=8, val_steps=None, print_freq=50),
    # demo: ResNet-18 on 64 px views, ~100 steps per stage. A bank that fills within the first stage; m = 0.99
    # because a 0.999 teacher would barely move from its random init in 100 steps; base lr 0.24 so that
    # batch 32 trains at 0.03 (the linear scaling rule would give 0.004, too slow to show anything).
    "demo": dict(arch="resnet18", img_size=64, batch_size=32, queue_size=2048, epochs=5, lr=0.24,
                 steps_per_epoch=None, momentum_ema=0.99, workers=2, val_steps=2, print_freq=7),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags come from the preset, and their help names its values."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_parser():
    p = argparse.ArgumentParser(
        description="Adam pretraining: coarse-to-fine contrastive learning of anatomy (MICCAI 2023).",
        formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="phantom",
                   help="'phantom' (generated on first use), 'chestxray14', 'eyepacs' (caches made by "
                        "data_prep.py), a cache folder, or any folder of PNG/JPEG images")
    g.add_argument("--data-root", default=None,
                   help="where a named dataset lives (default data/<name>)")
    g.add_argument("--phantom-images", type=int, default=1000,
                   help="how many phantoms to generate when data/phantom is missing")
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per process (paper: 8, demo: 2); 0 = load in the main process")
    g.add_argument("--gpu-views", action="store_true",
                   help="make both views of the whole batch on the training device (BatchViews) instead of per "
                        "sample in the CPU workers: use it when --time-data shows the workers cannot keep the GPU "
                        "busy; needs a data_prep.py cache (images of one size)")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="fills every flag left unset; default: 'demo' for --data phantom, else 'paper'")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, help="any torchvision ResNet (paper: resnet50)")
    g.add_argument("--img-size", type=int, default=None, help="side of each view (paper: 224)")
    g.add_argument("--dim", type=int, default=128, help="embedding size D of q, k and the bank")
    g = p.add_argument_group("method (paper Sect. 2)")
    g.add_argument("--levels", default="0,2,4",
                   help="granularity levels, one stage each, coarse to fine; '0' alone = MoCo-v2 (no AD)")
    g.add_argument("--queue-size", type=int, default=None, help="bank size K (paper: 65536)")
    g.add_argument("--temperature", type=float, default=0.2, help="tau of InfoNCE (MoCo-v2: 0.2)")
    g.add_argument("--threshold", type=float, default=0.8,
                   help="Purposive Pruner: bank entries with cosine >= t to the anchor are dropped; "
                        ">= 1 disables the pruner (ablation 'no PP')")
    g.add_argument("--prune-every-level", action="store_true",
                   help="prune at level 0 too (the authors' code prunes only at levels > 0)")
    g.add_argument("--momentum-ema", type=float, default=None, help="teacher EMA m (paper: 0.999)")
    g.add_argument("--loss", choices=["auto", "fused", "torch"], default="auto",
                   help="'fused' = the C++/CUDA op of adam_ext, 'torch' = the readable reference; "
                        "'auto' picks fused when it is built")
    g.add_argument("--tf32", action="store_true",
                   help="CUDA: allow TF32 in float32 matmuls, so the loss's bank products run on tensor cores "
                        "(the fused op's tc kernel, or cuBLAS for --loss torch); off: the loss stays exact fp32")
    g = p.add_argument_group("optimisation (authors' code: SGD, cosine per stage)")
    g.add_argument("--epochs", type=int, default=None, help="epochs per stage (paper: 200)")
    g.add_argument("--steps-per-epoch", type=int, default=None,
                   help="cap on steps per epoch, for smoke runs (default: the whole train split)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch over all processes (paper: 256)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate for batch 256, scaled linearly (paper: 0.03)")
    g.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--val-steps", type=int, default=None,
                   help="validation batches per epoch (no teacher/bank update); 0 = off, default all")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="runs/adam", help="run folder: checkpoint.pth, log.jsonl, backbones")
    g.add_argument("--resume", default=None,
                   help="run folder to continue from; flags you pass again override the saved ones")
    g.add_argument("--print-freq", type=int, default=None, help="progress line every N steps")
    g.add_argument("--time-data", type=int, default=0,
                   help="only time the input pipeline for N batches (decomposer + both views) and exit")
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume:  # the saved flags become the defaults; what the user passes again wins
        saved = load_checkpoint(Path(args.resume) / "checkpoint.pth")["args"]
        saved = {k: v for k, v in saved.items() if k not in ("resume", "out")}
        parser.set_defaults(**saved)
        args = parser.parse_args(argv)
        given = sys.argv[1:] if argv is None else argv
        args.out = args.out if "--out" in given else args.resume
    preset = PRESETS[args.preset or ("demo" if args.data == "phantom" else "paper")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.level_list = [int(n) for n in str(args.levels).split(",")]
        assert all(n >= 0 for n in args.level_list) and args.level_list
    except (ValueError, AssertionError):
        parser.error(f"--levels must be comma-separated levels >= 0, got {args.levels!r}")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0")
    if not hasattr(torchvision.models, args.arch) or not args.arch.startswith(("resnet", "wide_resnet")):
        parser.error(f"--arch {args.arch!r} is not a torchvision ResNet (try resnet18 or resnet50)")
    return args


# -----------------------------------------------------------------------------
# 2. Anatomy Decomposer (paper Sect. 2, Fig. 2 A-D). Level 0 is the whole image; level 1 cuts it
# vertically into left and right halves; each further level cuts every part again, alternating
# horizontal and vertical cuts. Level n has 2^n parts: 2x2 at level 2, 2 rows x 4 columns at level 3,
# 4x4 at level 4. Halves are floor/ceil, so the parts tile the image exactly for any size.

def anatomy_parts(height, width, level):
    """The 2^level parts of a height x width image as (top, left, height, width) boxes, row-major."""
    boxes = [(0, 0, height, width)]
    for cut in range(level):
        split = []
        for top, left, h, w in boxes:
            if cut % 2 == 0:  # vertical cut: left | right
                split += [(top, left, h, w // 2), (top, left + w // 2, h, w - w // 2)]
            else:             # horizontal cut: top / bottom
                split += [(top, left, h // 2, w), (top + h // 2, left, h - h // 2, w)]
        boxes = split
    if any(h == 0 or w == 0 for _, _, h, w in boxes):
        raise ValueError(f"a {height}x{width} image is too small for level {level}")
    return sorted(boxes)


# -----------------------------------------------------------------------------
# 3. Views (METHOD.md §3, the authors' augmentation, same for both views). The part is cropped at full
# resolution, then each view: random resized crop (scale 0.2-1), colour jitter p=0.8, Gaussian blur
# p=0.5, rotation +-30 deg, ImageNet normalisation of a 3-channel copy. No flip, no random greyscale:
# left and right matter in anatomy. The views are made from the 1-channel grey part (saturation and hue
# jitter leave grey pixels unchanged) and expanded to 3 channels only for the normalisation.

def imagenet_normalise(x):
    """B x C x S x S in [0, 1] -> B x 3 x S x S with ImageNet mean/std (METHOD.md §3: a 3-channel copy of grey)."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


class DataError(Exception):
    """Bad input data: the message names the file and, where there is one, the fix."""


class CacheImages:
    """Images of a data_prep.py cache (uint8 memory map): no decoding per sample."""

    def __init__(self, cache, split):
        self.images, self.rows, self.name = cache.images, cache.rows(split), str(cache.root)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        x = torch.from_numpy(np.array(self.images[self.rows[i]]))  # copy out of the memory map
        return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # C x H x W uint8


class FolderImages:
    """Any folder of PNG/JPEG images, decoded on the fly (slow for big images: prefer a cache)."""

    def __init__(self, root):
        exts = {".png", ".jpg", ".jpeg"}
        self.files = sorted(f for f in Path(root).rglob("*") if f.suffix.lower() in exts)
        if not self.files:
            raise DataError(f"--data {root}: no PNG/JPEG images in this folder")
        self.name = str(root)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                return T.functional.pil_to_tensor(im.convert("L"))  # 1 x H x W uint8
        except Exception as e:  # PIL raises many types; the user needs the file name
            raise DataError(f"cannot read image {self.files[i]}: {e}") from e


class AdamViews(torch.utils.data.Dataset):
    """For sample (index, seed): one random part at `level` (the AD), then two augmented views of it.

    The seed comes from the sampler, so what a sample looks like does not depend on the number of
    workers, and a resumed run sees exactly the crops the uninterrupted run would have seen."""

    def __init__(self, images, level, img_size, gpu_views=False):
        self.images, self.level, self.gpu_views = images, level, gpu_views
        s = img_size / 224  # blur kernel and sigma scale with the view size (authors: 224 px)
        self.view = T.Compose([
            T.RandomResizedCrop(img_size, scale=(0.2, 1.0), antialias=True),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomApply([T.GaussianBlur(2 * round(11 * s) + 1, sigma=(0.1 * s, 2.0 * s))], p=0.5),
            T.RandomRotation(30),
            T.ToDtype(torch.float32, scale=True),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = self.images[index]
            parts = anatomy_parts(x.shape[1], x.shape[2], self.level)
            top, left, h, w = parts[torch.randint(len(parts), ()).item()]
            if self.gpu_views:  # the views are made later, for the whole batch, by BatchViews on the device
                return x, torch.tensor([top, left, h, w]), torch.randint(2**62, ())  # image, part, view seed
            part = x[:, top:top + h, left:left + w]
            views = torch.stack([self.view(part), self.view(part)])               # 2 x C x S x S
            x_q, x_k = imagenet_normalise(views)
            return x_q, x_k


class PartSampler(torch.utils.data.Sampler):
    """Yields (index, seed) pairs: a seeded permutation per (stage, epoch), sharded over ranks."""

    def __init__(self, n, num_samples, seed, rank=0, world=1):
        self.n, self.num_samples, self.seed, self.rank, self.world = n, num_samples, seed, rank, world
        self.epoch_key = (0, 0)

    def set_epoch(self, stage, epoch):
        self.epoch_key = (stage, epoch)

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_key[0] * 10_007 + self.epoch_key[1])
        order = torch.randperm(self.n, generator=g)[self.rank::self.world][:self.num_samples]
        seeds = torch.randint(2**62, (self.n,), generator=g)[self.rank::self.world][:self.num_samples]
        return iter(zip(order.tolist(), seeds.tolist()))


# --- Batched views (--gpu-views): the same augmentation as AdamViews, one batch at a time on its device ---
# Issue 4 item 5: per-sample torchvision on the CPU makes ~80 images/s per core (measured), far below what
# a GPU trains at. With --gpu-views the workers return the full cached image, the AD's part box and a seed;
# BatchViews draws every random parameter on the CPU from that seed (the same on any device) and then
# transforms the whole batch with tensor ops. Differences from the per-sample reference, all small:
# - crop, resize and rotation are ONE bilinear interpolation in float (the reference does four in uint8,
#   rounding between them) and the rotation is bilinear (RandomRotation's default is nearest);
# - shrinking reads from a 2x, 4x, ... mean-pooled copy (a mip level) instead of torchvision's antialias
#   filter; the blur sees the real pixels around the crop where the reference reflects at its edge;
# - contrast uses the mean of the crop's pixels that stay in view after the rotation (ref.: all of them).

def random_crop_box(height, width, u, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params (10 tries, then the central fallback) driven by 22
    uniforms u in [0, 1) instead of the global generator. Returns (top, left, h, w) inside height x width."""
    area, log_r = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[2 * t + 1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w
    if width / height < ratio[0]:    # fallback: the central crop with the nearest allowed ratio
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_mip(x, grid, step):
    """F.grid_sample (bilinear) of x (B x C x H x W) at grid (B x S x S x 2), reading sample i from x pooled
    2^l times, l = round(log2(step_i)), step = source pixels per output pixel: a cheap stand-in for the
    antialiasing of torchvision's resize (plain bilinear aliases when it shrinks by more than ~1.4).
    Exact coordinates for even sizes (2x2 means keep the normalised pixel centres). Loops over levels only."""
    levels = step.log2().round().clamp(min=0).long().tolist()
    out = x.new_empty(x.shape[0], x.shape[1], grid.shape[1], grid.shape[2])  # B x C x S x S
    for level in sorted(set(levels)):
        idx = torch.tensor([i for i, l in enumerate(levels) if l == level], device=x.device)
        src = x if len(idx) == len(levels) else x[idx]                  # one level for all: no copy
        for _ in range(level):
            src = F.avg_pool2d(src, 2)
        out[idx] = F.grid_sample(src, grid[idx], mode="bilinear", padding_mode="border", align_corners=False)
    return out


def hue_shift(x, shift):
    """torchvision's adjust_hue on float RGB: to HSV, h <- (h + shift) mod 1, back. x: B x 3 x H x W, shift: B."""
    v = x.amax(1, keepdim=True)                                                     # value
    c = v - x.amin(1, keepdim=True)                                                 # chroma
    r, g, b = x.unbind(1)
    v0, d = v.squeeze(1), c.squeeze(1).clamp(min=1e-12)  # c = 0: grey, any hue gives the same pixel
    h = torch.where(v0 == r, (g - b) / d, torch.where(v0 == g, (b - r) / d + 2, (r - g) / d + 4))
    h = (h.unsqueeze(1) / 6 + shift.view(-1, 1, 1, 1)) % 1                          # B x 1 x H x W, turns
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h) % 6
    return v - c * torch.minimum(k, 4 - k).clamp(0, 1)                            # HSV -> RGB


class BatchViews(nn.Module):
    """Two views (METHOD.md §3) of one AD part per sample, for a batch: forward(x, boxes, seeds) -> (x_q, x_k).

    x: B x C x H x W uint8 full images (C = 1 or 3, any device), boxes: B x 4 (top, left, h, w) the parts,
    seeds: B int64. Per view and sample (parameters from a CPU generator seeded by the sample's seed):
      1. random resized crop in the part (scale 0.2-1, ratio 3/4-4/3) + rotation +-30 deg: one affine map,
         one F.grid_sample of the full image; what the rotation brings in from outside the crop is 0;
      2. colour jitter with p = 0.8: brightness, contrast, saturation 0.4, hue 0.1, in random order
         (saturation and hue leave grey unchanged, so grey images skip them);
      3. Gaussian blur with p = 0.5, sigma ~ U(0.1, 2.0) * S/224, kernel 2 round(11 S/224) + 1;
      4. grey -> 3 channels, ImageNet mean/std. Returns two B x 3 x S x S float32 tensors on x's device."""

    def __init__(self, img_size):
        super().__init__()
        s = img_size / 224  # blur kernel and sigma scale with the view size, as in AdamViews
        self.size, self.sigma, self.radius = img_size, (0.1 * s, 2.0 * s), round(11 * s)

    def draw(self, boxes, seeds):
        """The random parameters of both views, on the CPU: two dicts of tensors, one row per sample.
        crop: B x 4 (top, left, h, w) image pixels; angle: B degrees; jitter: B x 4 factors (brightness,
        contrast, saturation, hue; identities when not applied); order: B x 4 op ids; sigma: B (0 = no blur)."""
        views = [{"crop": [], "angle": [], "jitter": [], "order": [], "sigma": []} for _ in range(2)]
        for (top, left, h, w), seed in zip(boxes.tolist(), seeds.tolist()):
            g = torch.Generator().manual_seed(seed)
            for p, u in zip(views, torch.rand(2, 34, generator=g, dtype=torch.float64).tolist()):
                i, j, ch, cw = random_crop_box(h, w, u[:22])
                p["crop"].append((top + i, left + j, ch, cw))
                p["angle"].append(-30 + 60 * u[22])
                p["jitter"].append((0.6 + 0.8 * u[24], 0.6 + 0.8 * u[25], 0.6 + 0.8 * u[26], -0.1 + 0.2 * u[27])
                                   if u[23] < 0.8 else (1.0, 1.0, 1.0, 0.0))
                p["order"].append(sorted(range(4), key=lambda op: u[28 + op]))  # a uniform permutation
                p["sigma"].append(self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[33] if u[32] < 0.5 else 0.0)
        return [{k: torch.tensor(v, dtype=torch.float32 if k != "order" else torch.int64)
                 for k, v in p.items()} for p in views]

    @torch.no_grad()
    def forward(self, x, boxes, seeds):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"BatchViews: x must be B x C x H x W uint8, C = 1 or 3; got {x.dtype} {tuple(x.shape)}")
        if boxes.shape != (x.shape[0], 4) or seeds.shape != (x.shape[0],):
            raise ValueError(f"BatchViews: boxes must be B x 4 and seeds B for B = {x.shape[0]}, "
                             f"got {tuple(boxes.shape)} and {tuple(seeds.shape)}")
        x = x.float() / 255                                                  # B x C x H x W in [0, 1]
        p_q, p_k = self.draw(boxes, seeds)
        return self.views_with(x, p_q), self.views_with(x, p_k)

    def views_with(self, x, p):
        """One view of each sample with given parameters p (see draw). x: B x C x H x W float in [0, 1]."""
        B, C, H, W = x.shape
        S, dev = self.size, x.device
        top, left, h, w = p["crop"].to(dev).unbind(1)                        # B each
        a = p["angle"].to(dev) * math.pi / 180
        zero = torch.zeros_like(a)
        # rotation (inverse map, as torchvision's rotate): view -> resized crop, both [-1, 1] and square
        rot = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1)
        g = F.affine_grid(rot, [B, 1, S, S], align_corners=False)            # B x S x S x 2 (x, y)
        # resized crop -> image: [-1, 1] of the crop spans pixels left .. left + w - 1 (centres), likewise y
        scale = torch.stack([w / W, h / H], 1).view(B, 1, 1, 2)
        shift = torch.stack([(2 * left + w) / W - 1, (2 * top + h) / H - 1], 1).view(B, 1, 1, 2)
        step = p["crop"][:, 2:].amax(1) / S                                  # source px per view px (CPU)
        y = sample_mip(x, g * scale + shift, step)                          # B x C x S x S
        # torchvision's rotate fills 0 where its bilinear reads outside the crop: the same weight here
        u = ((g + 1) * S - 1) / 2                                            # crop pixel coordinates
        mask = torch.minimum(u + 1, S - u).clamp(0, 1).prod(-1).unsqueeze(1)  # B x 1 x S x S
        y = self.jitter(y, p["jitter"].to(dev), p["order"], mask)
        y = self.blur(y, p["sigma"]) * mask
        return imagenet_normalise(y)                                         # B x 3 x S x S

    @staticmethod
    def jitter(x, factors, order, mask=None):
        """ColorJitter with per-sample factors (B x 4: brightness, contrast, saturation, hue) applied in
        per-sample order (B x 4 op ids), as torchvision.transforms.v2.functional on float images: x: B x C x
        H x W in [0, 1]. Contrast's mean is over mask (B x 1 x H x W weights) when given. order on the CPU:
        choosing the ops then needs no device sync."""
        bri, con, sat, hue = factors.view(-1, 4, 1, 1, 1).unbind(1)         # B x 1 x 1 x 1 each
        grey = (lambda y: y) if x.shape[1] == 1 else \
            (lambda y: (0.2989 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1))
        weight = torch.ones_like(x[:, :1]) if mask is None else mask
        mean = lambda y: (grey(y) * weight).sum((1, 2, 3), keepdim=True) / weight.sum((1, 2, 3), keepdim=True)
        ops = [lambda y: (bri * y).clamp(0, 1),
               lambda y: (con * y + (1 - con) * mean(y)).clamp(0, 1),
               lambda y: (sat * y + (1 - sat) * grey(y)).clamp(0, 1),
               lambda y: hue_shift(y, hue)]
        for slot in range(4):
            for op in range(2 if x.shape[1] == 1 else 4):                    # grey: saturation, hue = identity
                pick = order[:, slot].cpu() == op
                if pick.any():
                    x = torch.where(pick.to(x.device).view(-1, 1, 1, 1), ops[op](x), x)
        return x

    def blur(self, x, sigma):
        """Gaussian blur of the samples with sigma > 0 (B; 0 = leave as is), reflect padding, torchvision's
        kernel: one grouped separable convolution with a kernel per sample. x: B x C x S x S float."""
        sigma = sigma.cpu()                                                  # choosing samples: no device sync
        on = (sigma > 0).nonzero().squeeze(1)
        if len(on) == 0:
            return x
        n, C, Hs, Ws = len(on), *x.shape[1:]
        r = self.radius
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        k = torch.softmax(-(t / sigma[on, None].to(x.device)) ** 2 / 2, dim=1).repeat_interleave(C, 0)  # nC x (2r+1)
        on = on.to(x.device)
        y = F.pad(x[on].reshape(1, n * C, Hs, Ws), (r, r, r, r), mode="reflect")
        y = F.conv2d(y, k.view(n * C, 1, 1, -1), groups=n * C)              # along x
        y = F.conv2d(y, k.view(n * C, 1, -1, 1), groups=n * C)              # along y
        x = x.clone()
        x[on] = y.view(n, C, Hs, Ws)
        return x


def open_images(args, split):
    """--data -> an indexable set of C x H x W uint8 tensors for `split` (folders have no splits)."""
    named = args.data in ("phantom", "chestxray14", "eyepacs", "jsrt")
    root = Path(args.data_root or f"data/{args.data}") if named else Path(args.data)
    import data_prep  # numpy + pillow only; builds and reads the caches
    if args.data == "phantom":  # rank 0 generates it (once), the other ranks wait and then read it
        first = not dist.is_initialized() or dist.get_rank() == 0
        if not first:
            dist.barrier()
        data_prep.ensure_phantom(root, num_images=args.phantom_images, seed=0)
        if first and dist.is_initialized():
            dist.barrier()
    if named and not (root / "meta.json").exists():
        raise FileNotFoundError(f"--data {args.data}: no prepared dataset at {root}; prepare it with "
                                f"`python data_prep.py {args.data} --src <downloaded folder> --out {root}`")
    if named or (root / "meta.json").exists():
        cache = data_prep.open_cache(root)  # names the path and the command that prepares it
        if not cache.rows(split):
            return None
        return CacheImages(cache, split)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--data {args.data}: no such folder. Give a folder of PNG/JPEG images, or prepare a dataset "
            f"with `python data_prep.py chestxray14 --src <download> --out data/chestxray14`")
    return FolderImages(root) if split == "train" else None


# -----------------------------------------------------------------------------
# 4. Encoder and head (METHOD.md §4): f = torchvision ResNet without its fc, h = Linear-ReLU-Linear
# (2048-2048-128 for ResNet-50). The output is L2-normalised in float32 even under bf16 autocast, so
# the loss and the bank see the same precision on every device.

class Encoder(nn.Module):
    def __init__(self, arch, dim):
        super().__init__()
        self.backbone = torchvision.models.__dict__[arch](weights=None)
        width = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()  # keeps torchvision key names for export
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))

    def forward(self, x):  # B x 3 x S x S -> B x D, unit norm
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


@torch.no_grad()
def ema_update(teacher, student, m):
    """xi <- m xi + (1 - m) theta (METHOD.md §4). Buffers (BN statistics) are the teacher's own, as in MoCo."""
    for xi, theta in zip(teacher.parameters(), student.parameters()):
        xi.mul_(m).add_(theta.detach(), alpha=1 - m)


# -----------------------------------------------------------------------------
# 5. Memory bank: K x D ring buffer of the teacher's keys, oldest overwritten first. Any batch size
# works: writes wrap around the end, and a batch larger than K keeps only its last K keys.

class MemoryBank:
    def __init__(self, K, dim, device, generator=None):
        self.queue = F.normalize(torch.randn(K, dim, generator=generator), dim=1).to(device)  # K x D
        self.ptr = 0

    @torch.no_grad()
    def enqueue(self, k):  # k: N x D
        K, n = self.queue.shape[0], k.shape[0]
        if n > K:
            k, self.ptr, n = k[-K:], (self.ptr + n - K) % K, K
        idx = (self.ptr + torch.arange(n, device=self.queue.device)) % K
        self.queue[idx] = k.to(self.queue.dtype)
        self.ptr = (self.ptr + n) % K


# -----------------------------------------------------------------------------
# 6. Purposive Pruner + InfoNCE (paper Sect. 2, METHOD.md §4). s_ij = q_i . b_j is both the negative
# logit (before / tau) and the pruner's similarity. Entry j is kept for anchor i iff s_ij < t; the
# positive is always kept, so every row has at least one finite logit:
#   L_i = logsumexp([q_i.k_i, s_ij for kept j] / tau) - q_i.k_i / tau,   loss = mean_i L_i.
# This is the readable reference: it builds B x K matrices. adam_ext.info_nce (csrc/) computes the
# same in one pass over the bank without them and is tested against this function.

def info_nce(q, k, queue, temperature, threshold, fused=False, return_pruned=False):
    """q, k: B x D, queue: K x D, all unit norm. threshold None = no pruning. Mean loss (0-dim)."""
    if fused:
        import adam_ext
        return adam_ext.info_nce(q, k, queue, temperature, threshold, return_pruned=return_pruned)
    l_pos = (q * k).sum(dim=1, keepdim=True)                       # B x 1
    s = q @ queue.t()                                              # B x K
    pruned = s.detach() >= threshold if threshold is not None else torch.zeros_like(s, dtype=torch.bool)
    logits = torch.cat([l_pos, s.masked_fill(pruned, float("-inf"))], dim=1) / temperature  # B x (1+K)
    loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    if return_pruned:
        return loss, pruned.float().mean()
    return loss


def choose_loss(flag, device, say):
    """--loss auto|fused|torch -> use the fused op? adam_ext decides: it knows what it was built for, and it
    checks its kernels against info_nce above on this device first (adam_ext/selfcheck.py)."""
    try:
        import adam_ext
    except ImportError as e:  # an install without the op's package: the reference is the whole method
        if flag == "fused":
            raise ValueError(f"--loss fused: adam_ext is not importable ({e}); use --loss torch") from None
        say(f"loss: pure-PyTorch reference ({flag}; adam_ext not importable: {e})")
        return False
    return adam_ext.choose_path(flag, device, reference=info_nce, say=say)


# -----------------------------------------------------------------------------
# 7-8. Coarse-to-fine training. One stage per level; student, teacher and bank carry over between
# stages; optimiser, cosine schedule and epoch counter restart (METHOD.md §5).

def setup_devices(args):
    """Returns (device, rank, world). torchrun sets WORLD_SIZE; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and world > 1:
        want = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(want)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


@torch.no_grad()
def all_gather(x):
    if not dist.is_initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def teacher_keys(teacher, x_k):
    """k = h_xi(f_xi(x_k)). With several processes, "shuffle BN" (MoCo): the batch is permuted across
    ranks before the teacher, so its BatchNorm statistics never come from the same images as the
    student's and cannot leak the positive. One process: no shuffle (a known small leak, as in most
    single-GPU MoCo ports)."""
    if not dist.is_initialized():
        return teacher(x_k)
    rank, b = dist.get_rank(), x_k.shape[0]
    x_all = all_gather(x_k)                                   # (world*B) x 3 x S x S
    perm = torch.randperm(x_all.shape[0], device=x_k.device)
    dist.broadcast(perm, src=0)
    k_all = all_gather(teacher(x_all[perm[rank * b:(rank + 1) * b]]))
    return k_all[torch.argsort(perm)][rank * b:(rank + 1) * b]


def save_atomic(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash leaves the old file or the new one, never half of one


def load_checkpoint(path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint is data, not code


def save_checkpoint(path, **state):
    save_atomic(state, path)


def export_backbone(student, path):
    """The backbone alone, torchvision keys: torchvision.models.<arch>() loads it with only fc.* missing."""
    save_atomic({k: v.contiguous() for k, v in student.backbone.state_dict().items()}, path)


def log_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def make_loader(images, level, args, num_samples, world, rank, seed, batch):
    dataset = AdamViews(images, level, args.img_size, args.gpu_views)
    sampler = PartSampler(len(images), num_samples, seed, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None)
    return loader, sampler


def to_views(item, views, device, memory_format=torch.preserve_format):
    """A loader batch -> (x_q, x_k) on device, in memory_format (one copy each: transfer and layout together).
    --gpu-views: (images, parts, seeds) -> BatchViews there."""
    if views is None:
        return tuple(x.to(device, non_blocking=True, memory_format=memory_format) for x in item)
    x, boxes, seeds = item
    return tuple(v.contiguous(memory_format=memory_format) for v in views(x.to(device, non_blocking=True), boxes, seeds))


def time_data(args, images, batch, device):
    """--time-data N: images/s of the input pipeline alone (AD + both views, on `device` with --gpu-views)."""
    level, n = args.level_list[-1], min(args.time_data, len(images) // batch - 2)  # one pass, no repeats
    if n < 1:
        raise ValueError(f"--time-data needs at least {3 * batch} images, {images.name} has {len(images)}")
    loader, _ = make_loader(images, level, args, batch * (n + 2), 1, 0, args.seed, batch)
    it = iter(loader)
    views = BatchViews(args.img_size) if args.gpu_views else None
    to_views(next(it), views, device), to_views(next(it), views, device)  # warm-up: worker start, first decode
    t0 = time.perf_counter()
    for _ in range(n):
        x_q, x_k = to_views(next(it), views, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = n * batch / (time.perf_counter() - t0)
    print(f"input pipeline: {rate:.0f} images/s ({images.name}, level {level}, {args.img_size} px, "
          f"batch {batch}, {args.workers} workers, views {'BatchViews on ' + device.type if views else 'in workers'})")
    return rate


def main(argv=None):
    args = parse_args(argv)
    device, rank, world = setup_devices(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    batch = args.batch_size // world                               # per process
    train_images = open_images(args, "train")
    if train_images is None or len(train_images) < args.batch_size:
        n = 0 if train_images is None else len(train_images)
        raise ValueError(f"--data {args.data}: train split has {n} images, fewer than --batch-size {args.batch_size}")
    if args.gpu_views and not isinstance(train_images, CacheImages):
        raise ValueError(f"--gpu-views needs a data_prep.py cache (images of one size); --data {args.data} is a "
                         f"folder: prepare it with `python data_prep.py folder --src {args.data} --out <cache>`")
    if args.time_data:
        return {"images_per_s": time_data(args, train_images, batch, device)}
    val_images = open_images(args, "val") if args.val_steps != 0 else None
    torch.manual_seed(args.seed)

    # models, bank, loss path
    student = Encoder(args.arch, args.dim).to(device)
    teacher = copy.deepcopy(student)                               # xi initialised as a copy of theta
    for p in teacher.parameters():
        p.requires_grad = False
    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.preserve_format  # bf16 autocast + channels_last on GPUs
    student, teacher = student.to(memory_format=layout), teacher.to(memory_format=layout)
    bank = MemoryBank(args.queue_size, args.dim, device, torch.Generator().manual_seed(args.seed))
    model = nn.parallel.DistributedDataParallel(student, device_ids=[device] if cuda else None) \
        if world > 1 else student
    fused = choose_loss(args.loss, device, say)
    if args.tf32 and cuda:  # the op's launcher reads the same flag (csrc/info_nce_cuda.cu)
        torch.backends.cuda.matmul.allow_tf32 = True
        say("tf32: float32 matmuls may use TF32 (the loss's bank products on tensor cores)")
    views = BatchViews(args.img_size) if args.gpu_views else None  # --gpu-views: augment on the device
    lr = args.lr * args.batch_size / 256

    start_stage, start_epoch, step, ckpt = 0, 0, 0, None
    if args.resume:
        ckpt = load_checkpoint(Path(args.resume) / "checkpoint.pth")
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        bank.queue.copy_(ckpt["bank"])
        bank.ptr = ckpt["bank_ptr"]
        start_stage, start_epoch, step = ckpt["stage"], ckpt["epoch"], ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if start_epoch == args.epochs:                             # that stage had finished
            start_stage, start_epoch = start_stage + 1, 0
        say(f"resuming {args.resume}: stage {start_stage + 1}, epoch {start_epoch + 1}, step {step}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    n_train = len(train_images)
    steps_per_epoch = n_train // args.batch_size
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    total_steps = len(args.level_list) * args.epochs * steps_per_epoch
    say(f"data: {train_images.name}, {n_train} train images; {args.arch} at {args.img_size} px; "
        f"levels {args.level_list}, {args.epochs} epochs x {steps_per_epoch} steps; batch {args.batch_size} "
        f"on {world} x {device.type}; K={args.queue_size} tau={args.temperature} t={args.threshold} "
        f"m={args.momentum_ema}")
    summary = {"out": str(out), "stages": [], "backbones": []}
    t_run, steps_run = time.time(), 0

    for stage in range(start_stage, len(args.level_list)):
        level = args.level_list[stage]
        prune = (level > 0 or args.prune_every_level) and args.threshold < 1
        t = args.threshold if prune else None                      # >= 1 prunes nothing: skip the mask
        optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.wd)
        if ckpt is not None and stage == ckpt["stage"] and start_epoch > 0:
            optimizer.load_state_dict(ckpt["optimizer"])
        loader, sampler = make_loader(train_images, level, args, steps_per_epoch * batch, world, rank,
                                      args.seed, batch)
        stage_log = {"level": level, "threshold": t, "losses": [], "epochs": []}
        summary["stages"].append(stage_log)
        say(f"== stage {stage + 1}/{len(args.level_list)}: level {level} "
            f"({len(anatomy_parts(256, 256, level))} parts), pruner {'t=%g' % t if t else 'off'}")
        for epoch in range(start_epoch if stage == start_stage else 0, args.epochs):
            epoch_lr = lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))  # cosine per epoch
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr
            sampler.set_epoch(stage, epoch)
            model.train()
            teacher.train()
            t_epoch, loss_sum, pruned_sum = time.time(), 0.0, 0.0
            for i, item in enumerate(loader):
                x_q, x_k = to_views(item, views, device, layout)          # B x 3 x S x S each
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    q = model(x_q)                                         # B x D
                    k = teacher_keys(teacher, x_k)                         # B x D, no grad
                loss, pruned = info_nce(q, k, bank.queue, args.temperature, t, fused=fused, return_pruned=True)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema_update(teacher, student, args.momentum_ema)
                bank.enqueue(all_gather(k))                                # after the loss (MoCo order)
                step, steps_run = step + 1, steps_run + 1
                loss_v, pruned_v = loss.item(), pruned.item()
                loss_sum, pruned_sum = loss_sum + loss_v, pruned_sum + pruned_v
                stage_log["losses"].append(loss_v)
                if (i + 1) % args.print_freq == 0 or i + 1 == steps_per_epoch:
                    rate = (i + 1) * args.batch_size / (time.time() - t_epoch)
                    eta = (time.time() - t_run) / steps_run * (total_steps - step)
                    say(f"level {level} epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} "
                        f"loss {loss_sum / (i + 1):.4f} lr {epoch_lr:.4g} pruned {100 * pruned_sum / (i + 1):.1f}% "
                        f"{rate:.0f} img/s ETA {eta / 60:.1f} min", flush=True)
            record = {"stage": stage, "level": level, "epoch": epoch + 1, "step": step,
                      "loss": loss_sum / steps_per_epoch, "lr": epoch_lr,
                      "pruned": pruned_sum / steps_per_epoch,
                      "images_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch),
                      "val_loss": validate(student, teacher, bank, val_images, level, t, args, fused,
                                           device, world, rank, batch, views)}
            stage_log["epochs"].append(record)
            if rank == 0:
                log_jsonl(out / "log.jsonl", record)
                if epoch + 1 == args.epochs:                        # end of stage: export the backbone
                    path = out / f"adam_{args.arch}_level{level}.pth"
                    export_backbone(student, path)
                    summary["backbones"].append(str(path))
                save_checkpoint(out / "checkpoint.pth", args={k: v for k, v in vars(args).items()},
                                arch=args.arch, level=level, stage=stage, epoch=epoch + 1, step=step,
                                student=student.state_dict(), teacher=teacher.state_dict(),
                                bank=bank.queue.cpu(), bank_ptr=bank.ptr, optimizer=optimizer.state_dict(),
                                rng={"torch": torch.get_rng_state()})
        say(f"== stage level {level} done: loss {stage_log['epochs'][0]['loss'] if stage_log['epochs'] else float('nan'):.4f}"
            f" -> {stage_log['epochs'][-1]['loss'] if stage_log['epochs'] else float('nan'):.4f}")
    say(f"done in {(time.time() - t_run) / 60:.1f} min; backbones: {', '.join(summary['backbones']) or '-'}")
    return summary


@torch.no_grad()
def validate(student, teacher, bank, val_images, level, t, args, fused, device, world, rank, batch, views=None):
    """Mean loss on the validation split at this level; no EMA, no enqueue (the authors' validation also
    updated the teacher and the bank, METHOD.md §5; we do not). The same crops every epoch."""
    if val_images is None or len(val_images) < batch * world:
        return None
    n = len(val_images) // (batch * world)
    n = min(n, args.val_steps) if args.val_steps else n
    loader, sampler = make_loader(val_images, level, args, n * batch, world, rank, args.seed + 1, batch)
    student.eval()
    teacher.eval()
    total = torch.zeros((), device=device)
    cuda = device.type == "cuda"
    for item in loader:
        x_q, x_k = to_views(item, views, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            q, k = student(x_q), teacher(x_k)
        total += info_nce(q, k, bank.queue, args.temperature, t, fused=fused)
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.item() / (n * world)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, DataError) as e:  # bad input: one clear line, no traceback
        # an error raised in a DataLoader worker arrives wrapped with its traceback: keep the last line
        sys.exit(f"adam.py: error: {str(e).strip().splitlines()[-1]}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
