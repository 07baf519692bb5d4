"""
Adam: autodidactic dense anatomical models, the whole pretraining method in one file.

    Hosseinzadeh Taher, Gotway, Liang. "Towards Foundation Models Learned from Anatomy in Medical
    Imaging via Self-Supervision". MICCAI 2023 DART (arXiv 2309.15358).

Sections, in the order of the paper (Sect. 2, Fig. 2; the method's spec is docs/METHOD.md):
  1. settings               PRESETS: the paper's (= the authors' release) and the CPU demo's; ARCHS
  2. Anatomy Decomposer     anatomy_parts(): level n -> 2^n boxes that tile the image
  3. views                  two augmented views of one random part per image; the part sampler
  4. encoder + EMA          student f_theta, h_theta; teacher f_xi, h_xi = EMA of the student
  5. memory bank            K x D ring buffer of the teacher's keys (the negatives)
  6. Purposive Pruner + InfoNCE   info_nce(): drop bank entries too similar to the anchor, then contrast
  7. teacher keys           shuffle BN: split BatchNorm in one process, a batch shuffle across processes
  8. training               main(): one stage per level (0 -> 2 -> 4) and the training step; validate()
  9. configuration          parse_args(): the command line, grouped flags; unset flags come from the preset
 10. plumbing               devices, loss path, data, loaders (the run folder, checkpoints, export: adam_cxr/runs.py)

`python adam.py` runs the CPU demo on procedurally generated chest phantoms (preset "demo");
`python adam.py --data chestxray14` runs the paper's recipe (preset "paper"); `torchrun` runs it on
many GPUs (or CPU processes with gloo). See README.md.
"""
import argparse
import copy
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# OpenMP threads that spin while they wait take the cores from DataLoader workers and other processes
# (BENCHMARKS.md, "an OpenMP pitfall"); sleeping waits cost nothing measurable. Must be set before torch loads
# libgomp; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2 as T

import data_prep  # datasets: numpy + pillow only
from adam_cxr.gpu_views import BatchViews  # --views device: both views of a batch on the training device
from adam_cxr import monitor  # the embedding monitor: what the pruner sees, alignment/uniformity, curves.png
from adam_cxr import runs  # the run folder: args.json, log.jsonl, checkpoints, exports, resume
from data_prep import DataError  # bad input data, named with its file

# -----------------------------------------------------------------------------
# 1. Settings. Flags left at None take their value from a preset (section 9): "paper" reproduces the
# authors' settings (docs/METHOD.md §3-5), "demo" is a CPU-sized run of the same method.

PRESETS = {
    "paper": dict(arch="resnet50", img_size=224, batch_size=256, queue_size=65536, epochs=200, lr=0.03,
                  steps_per_epoch=None, momentum_ema=0.999, workers=8, val_steps=None, print_freq=50,
                  crop_scale=0.2, jitter=0.4, temperature=0.2, bn_group_images=64),
    # demo: ResNet-18 on 64 px views, 105 steps per stage (about 4 min on 2 CPU cores). m = 0.99 because a 0.999
    # teacher would barely move from its random init in 105 steps; base lr 0.24 so that batch 32 trains at 0.03 (the
    # linear scaling rule would give 0.004, too slow to show anything). The rest is what the phantom search found
    # to learn anatomy in this budget (docs/learning.md, "The phantom"): crops of at least 60 % (a 20 % crop of a part
    # at 64 px leaves too little to tell apart); jitter 0.3 (0.4 leaves the embedding collapsed, 0 lets it tell
    # phantoms apart by their grey levels); tau 0.1 (at 0.2 the phantoms' nearly equal embeddings give the loss
    # almost no gradient in 105 steps); a bank of 256, fewer than the 700 train phantoms, so that it rarely holds
    # an older key of the anchor's own image; shuffle BN over groups of 8 images (4 at batch 32).
    "demo": dict(arch="resnet18", img_size=64, batch_size=32, queue_size=256, epochs=5, lr=0.24,
                 steps_per_epoch=None, momentum_ema=0.99, workers=2, val_steps=2, print_freq=7,
                 crop_scale=0.6, jitter=0.3, temperature=0.1, bn_group_images=8),
}
# The backbones every script accepts (adam.py, finetune.py, eve.py): torchvision's ResNets.
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2")


# -----------------------------------------------------------------------------
# 2. Anatomy Decomposer (paper Sect. 2, Fig. 2 A-D; docs/METHOD.md §2). Level 0 is the whole image; level 1
# cuts it into left | right halves; each further level cuts every part again, alternating horizontal and
# vertical cuts: 2x2 parts at level 2, 2 rows x 4 columns at 3, 4x4 at 4. Floor/ceil halves tile any size.

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
# 3. Views (docs/METHOD.md §3: the authors' augmentation, the same for both views; no flip, no random
# greyscale, as left and right matter in anatomy). The part is cropped at full resolution; the views are
# made from the 1-channel grey part (saturation and hue jitter leave grey pixels unchanged) and expanded to
# 3 channels only for the normalisation, which runs on the training device for the whole batch (to_views):
# the loader ships uint8 bytes, a twelfth of the normalised 3-channel floats.

@functools.lru_cache(maxsize=None)
def imagenet_stats(device):
    """ImageNet mean and std, each 3 x 1 x 1, on `device`: made once per device, as a copy to a GPU on every
    call would make the host wait for the GPU (a host sync)."""
    return (torch.tensor([0.485, 0.456, 0.406], device=device).view(3, 1, 1),
            torch.tensor([0.229, 0.224, 0.225], device=device).view(3, 1, 1))


def imagenet_normalise(x):
    """... x C x H x W in [0, 1], C = 1 or 3 -> ... x 3 x H x W with ImageNet mean/std: grey becomes a
    3-channel copy (docs/METHOD.md §3). The one normalisation of pretraining, fine-tuning and Eve."""
    mean, std = imagenet_stats(x.device)
    return (x.expand(*x.shape[:-3], 3, *x.shape[-2:]) - mean) / std


class SeparableGaussianBlur(T.GaussianBlur):
    """torchvision's GaussianBlur - same sigma draw, kernel, reflect padding, uint8 rounding - as two 1-D passes
    instead of one k x k convolution, which took ~80% of a view's CPU time. Same pixels up to a rounding tie."""

    def transform(self, x, params):
        k, sigma = self.kernel_size[0], params["sigma"][0]
        lim = (k - 1) / (2 * math.sqrt(2))                    # torchvision's kernel: softmax(-(t / sigma)^2)
        w = torch.softmax(-(torch.linspace(-lim, lim, k) / sigma) ** 2, dim=0)
        y = F.pad(x.float()[None], (k // 2,) * 4, mode="reflect")             # 1 x C x (H+k-1) x (W+k-1)
        y = F.conv2d(F.conv2d(y, w.view(1, 1, 1, k).expand(x.shape[0], 1, 1, k), groups=x.shape[0]),
                     w.view(1, 1, k, 1).expand(x.shape[0], 1, k, 1), groups=x.shape[0])[0]
        return y if x.is_floating_point() else y.round_().to(x.dtype)


class AdamViews(torch.utils.data.Dataset):
    """For sample (index, seed): one random part at `level` (the AD), then two augmented views of it, C x S x S
    uint8 each (to_views scales and normalises them on the training device). With device_views (a
    gpu_views.BatchViews, --views device) the views are left to it: the sample is the part, padded to the level's
    largest part, and the parameters of both views, drawn here in the worker from the sample's seed.

    The seed comes from the sampler, so what a sample looks like does not depend on the number of
    workers, and a resumed run sees exactly the crops the uninterrupted run would have seen."""

    def __init__(self, images, level, img_size, device_views=None, crop_scale=0.2, jitter=0.4):
        self.images, self.level, self.device_views = images, level, device_views
        s = img_size / 224  # blur kernel and sigma scale with the view size (authors: 224 px)
        self.view = T.Compose([  # crop_scale 0.2 and jitter 0.4 are MoCo v2's (the paper's); the demo sets its own
            T.RandomResizedCrop(img_size, scale=(crop_scale, 1.0), antialias=True),
            T.RandomApply([T.ColorJitter(jitter, jitter, jitter, jitter / 4)], p=0.8 if jitter else 0),
            T.RandomApply([SeparableGaussianBlur(2 * round(11 * s) + 1, sigma=(0.1 * s, 2.0 * s))], p=0.5),
            T.RandomRotation(30),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues a seed for every accelerator (most of a sample's
            # CPU time here); the workers draw from the CPU's, and fork_rng restores it
            torch.default_generator.manual_seed(seed)
            cache = isinstance(self.images, data_prep.CacheImages)  # a cache: read the part's rows only
            x = None if cache else torch.as_tensor(self.images[index])         # C x H x W uint8
            parts = anatomy_parts(*(self.images.size if cache else x.shape[1:]), self.level)
            top, left, h, w = parts[torch.randint(len(parts), ()).item()]
            part = torch.as_tensor(self.images.part(index, top, left, h, w)) if cache else \
                x[:, top:top + h, left:left + w]                               # C x h x w uint8
            if self.device_views is None:
                return self.view(part), self.view(part)                        # C x S x S uint8 each
            # floor/ceil halves differ by a pixel: repeat the last row / column so that a batch stacks
            ph, pw = max(b[2] for b in parts), max(b[3] for b in parts)
            if (h, w) != (ph, pw):
                part = part[:, torch.arange(ph).clamp(max=h - 1)][:, :, torch.arange(pw).clamp(max=w - 1)]
            return part, self.device_views.draw(torch.tensor([[0, 0, h, w]]), torch.randint(2**62, (1,)))[0]


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


# -----------------------------------------------------------------------------
# 4. Encoder and head (docs/METHOD.md §4): f = torchvision ResNet without its fc, h = Linear-ReLU-Linear
# (2048-2048-128 for ResNet-50). The output is L2-normalised in float32 even under bf16 autocast, so
# the loss and the bank see the same precision on every device.

class Encoder(nn.Module):
    def __init__(self, arch, dim, bn_groups=1):
        super().__init__()
        norm = lambda c: SplitBatchNorm(c, bn_groups)  # section 7; its state_dict is BatchNorm2d's
        self.backbone = torchvision.models.__dict__[arch](weights=None, norm_layer=norm)
        width = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()  # keeps torchvision key names for export
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))

    def forward(self, x):  # B x 3 x S x S -> B x D, unit norm
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


def feature_map(backbone, x):
    """The last convolutional map of a torchvision ResNet (layer4, stride 32), before the global average pool:
    B x 3 x S x S -> B x C x S/32 x S/32. What Eve's dense measures and the dense baselines (baselines.py) read."""
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    return backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))


@torch.no_grad()
def ema_update(teacher, student, m):
    """xi <- m xi + (1 - m) theta (docs/METHOD.md §4). Buffers (BN statistics) are the teacher's own, as in MoCo."""
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
# 6. Purposive Pruner + InfoNCE (paper Sect. 2, docs/METHOD.md §4). s_ij = q_i . b_j is both the negative
# logit (before / tau) and the pruner's similarity. Entry j is kept for anchor i iff s_ij < t; the
# positive is always kept, so every row has at least one finite logit:
#   L_i = logsumexp([q_i.k_i, s_ij for kept j] / tau) - q_i.k_i / tau,   loss = mean_i L_i.
# This is the readable reference: it builds B x K matrices. adam_ext.info_nce (csrc/) computes the
# same in one pass over the bank without them and is tested against this function; choose_loss picks one.

def info_nce(q, k, queue, temperature, threshold, return_pruned=False):
    """q, k: B x D, queue: K x D, all unit norm. threshold None = no pruning. Mean loss (0-dim)."""
    l_pos = (q * k).sum(dim=1, keepdim=True)                       # B x 1
    s = q @ queue.t()                                              # B x K
    pruned = s.detach() >= threshold if threshold is not None else torch.zeros_like(s, dtype=torch.bool)
    logits = torch.cat([l_pos, s.masked_fill(pruned, float("-inf"))], dim=1) / temperature  # B x (1+K)
    loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    if return_pruned:
        return loss, pruned.float().mean()
    return loss


# -----------------------------------------------------------------------------
# 7. Teacher keys and shuffle BN (docs/METHOD.md §5). A query and its key normalised over the same images can match
# through the BatchNorm statistics ("cheat", MoCo). The authors' 4 GPUs each normalise 64 images and the teacher sees
# a batch shuffled across GPUs; one process splits its batch into G groups and regroups it for the teacher.

class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that trains on `groups` interleaved sub-batches (group g = images g, g+G, ...), each with its own
    statistics, moving the running statistics to the groups' mean. groups = 1 and eval mode are plain BatchNorm2d."""

    def __init__(self, num_features, groups=1):
        super().__init__(num_features)
        self.groups = groups

    def forward(self, x):
        (B, C, H, W), G = x.shape, self.groups
        if G == 1 or not self.training:
            return super().forward(x)
        if B % G or B < 2 * G:
            raise ValueError(f"--bn-groups {G} must split the per-process batch {B} into groups of >= 2 images")
        self.num_batches_tracked += 1  # below: n x GC x H x W, group g in channels gC .. gC + C - 1
        mean, var = self.running_mean.repeat(G), self.running_var.repeat(G)
        y = F.batch_norm(x.reshape(B // G, G * C, H, W), mean, var, self.weight.repeat(G), self.bias.repeat(G),
                         True, self.momentum, self.eps)
        self.running_mean.copy_(mean.view(G, C).mean(0)), self.running_var.copy_(var.view(G, C).mean(0))
        return y.view(B, C, H, W)


def bn_groups(args, batch):
    """G of a per-process batch: --bn-groups, else one group per `bn_group_images` of the preset (paper: 64, the
    authors' per-GPU batch; demo: 8), at least one."""
    return args.bn_groups or max(1, batch // args.bn_group_images)


def shuffle_groups(B, G, device="cpu"):
    """The teacher's order of a batch of B: image i (student group i % G, slot i // G) goes to teacher group
    (i + i // G) % G, so each teacher group takes B/G^2 images from every student group (G^2 | B), or one from each
    of B/G groups (B/G <= G), and no key shares its statistics with its query. Position p*G + h: h's p-th image."""
    i = torch.arange(B, device=device)  # made where it is used: a copy to a GPU would be a host sync per step
    return ((i % G + i // G) % G).argsort(stable=True).view(G, B // G).t().flatten()


@torch.no_grad()
def teacher_keys(teacher, x_k, groups=1):
    """k = h_xi(f_xi(x_k)). One process: the batch in shuffle_groups' order (G = 1: as it is, plain BN). Several:
    MoCo's shuffle BN, the batch permuted across ranks before the teacher (and split into G groups on each)."""
    if not dist.is_initialized():
        perm = shuffle_groups(x_k.shape[0], groups, x_k.device) if groups > 1 else None
        return teacher(x_k) if perm is None else teacher(x_k[perm])[perm.argsort()]
    rank, b = dist.get_rank(), x_k.shape[0]
    x_all = all_gather(x_k)                                   # (world*B) x 3 x S x S
    perm = torch.randperm(x_all.shape[0], device=x_k.device)
    dist.broadcast(perm, src=0)
    k_all = all_gather(teacher(x_all[perm[rank * b:(rank + 1) * b]]))
    return k_all[torch.argsort(perm)][rank * b:(rank + 1) * b]


# -----------------------------------------------------------------------------
# 8. Coarse-to-fine training (docs/METHOD.md §5). One stage per level; student, teacher and bank carry
# over between stages; optimiser, cosine schedule and epoch counter restart.

def train_step(x_q, x_k, model, teacher, bank, optimizer, args, threshold, criterion, groups, monitor=None, i=0):
    """One step (docs/METHOD.md §4-5) on the views x_q, x_k (B x 3 x S x S on the device): q from the student,
    k from the teacher, the pruned InfoNCE against the bank, SGD, the teacher's EMA, then k into the bank (MoCo's
    order; the monitor sees the bank the loss saw). model / teacher: the modules as called (DDP, compiled) - their
    parameters are the student's and the teacher's. Returns (loss, pruned fraction) as 0-dim device tensors:
    nothing here waits for the device, so the host queues the next step while this one runs."""
    with torch.autocast(x_q.device.type, dtype=torch.bfloat16, enabled=x_q.device.type == "cuda"):
        q = model(x_q)                                                     # B x D
        k = teacher_keys(teacher, x_k, groups)                             # B x D, no grad
    loss, pruned = criterion(q, k, bank.queue, args.temperature, threshold, return_pruned=True)  # section 6
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    ema_update(teacher, model, args.momentum_ema)
    if monitor is not None:
        monitor.observe(i, q, k, bank.queue)                               # the bank the loss saw
    bank.enqueue(all_gather(k))                                            # after the loss (MoCo order)
    return loss.detach(), pruned


def pruning_threshold(args, level):
    """The pruner's t at this level, None where it is off: the authors prune only at levels > 0 (docs/METHOD.md §4);
    t >= 1 prunes nothing."""
    return args.threshold if (level > 0 or args.prune_every_level) and args.threshold < 1 else None


def main(argv=None):
    args = parse_args(argv)
    device, rank, world = setup_devices(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    train_images, val_images, views = open_data(args, world, device)  # views: BatchViews for device views
    batch, out = args.batch_size // world, Path(args.out)          # batch: per process
    torch.manual_seed(args.seed)
    student, teacher, bank, model, teacher_fwd, groups, layout = build_models(args, device, world, batch)
    criterion = choose_loss(args.loss, device, say)                # info_nce, or the fused op that matches it
    ctx = Context(args, device, rank, world, views, criterion)     # what the loaders and validate() share
    lr = args.lr * args.batch_size / 256                           # linear scaling rule
    start_stage, start_epoch, step, ckpt = runs.resume(args, student, teacher, bank, say)
    run = runs.RunFolder(args, loss_record(criterion), rank == 0, ckpt,  # OUT: args.json, log, checkpoints
                         runs.data_identity(train_images.name, getattr(train_images, "files", None)))
    steps_per_epoch = min(len(train_images) // args.batch_size, args.steps_per_epoch or math.inf)
    total_steps = len(args.level_list) * args.epochs * steps_per_epoch
    mon = monitor.Monitor(args.threshold, steps_per_epoch)        # similarities on a few anchors, a few steps
    say(f"data: {train_images.name}, {len(train_images)} train images; {args.arch} at {args.img_size} px; "
        f"levels {args.level_list}, {args.epochs} epochs x {steps_per_epoch} steps; batch {args.batch_size} "
        f"on {world} x {device.type}, BN groups {groups}; K={args.queue_size} tau={args.temperature} "
        f"t={args.threshold} m={args.momentum_ema}; views "
        + (f"on {device.type} (BatchViews)" if views else f"in {args.workers} CPU workers" if args.workers else
           "in this process"))
    if args.queue_size > 4 * len(train_images):  # the bank's negatives should be keys of other images (§4)
        say(f"WARNING: --queue-size {args.queue_size} is {args.queue_size / len(train_images):.0f}x the "
            f"{len(train_images)} train images: the bank holds many earlier keys of each anchor's own image, "
            f"contrasted as negatives; use a --queue-size below the number of train images, or more images")
    summary = {"out": str(out), "stages": [], "backbones": []}
    t_run, steps_run = time.time(), 0

    for stage in range(start_stage, len(args.level_list)):
        level = args.level_list[stage]
        t = pruning_threshold(args, level)
        optimizer = make_optimizer(student, lr, args)
        if ckpt is not None and stage == ckpt["stage"] and start_epoch > 0:
            optimizer.load_state_dict(ckpt["optimizer"])
            for group in optimizer.param_groups:  # the flag given now, not the one saved
                group["fused"] = args.fused_sgd or None
        loader, sampler = make_loader(train_images, level, num_samples=steps_per_epoch * batch, seed=args.seed, ctx=ctx)
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
            t_epoch, loss_sum, pruned_sum, pending = time.time(), 0.0, 0.0, []
            for i, item in enumerate(device_batches(loader, device, views)):
                x_q, x_k = to_views(item, views, layout)                   # B x 3 x S x S each
                pending.append(train_step(x_q, x_k, model, teacher_fwd, bank, optimizer, args, t, criterion, groups,
                                          mon, i))
                step, steps_run = step + 1, steps_run + 1
                if (i + 1) % args.print_freq == 0 or i + 1 == steps_per_epoch:
                    # the host reads the losses here only (one sync per print interval, not one per step)
                    values = torch.stack([torch.stack([l.float(), p.float()]) for l, p in pending]).tolist()
                    for s, (loss_v, pruned_v) in zip(range(step - len(pending) + 1, step + 1), values):
                        if not math.isfinite(loss_v):                      # diverged: stop before writing anything
                            raise runs.diverged("the loss", stage, level, epoch + 1, i + 1 - (step - s), args)
                        loss_sum, pruned_sum = loss_sum + loss_v, pruned_sum + pruned_v
                        stage_log["losses"].append(loss_v)
                        run.step(s, loss=loss_v, pruned=pruned_v)
                    pending = []
                    eta = (time.time() - t_run) / steps_run * (total_steps - step)
                    say(f"level {level} epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} "
                        f"loss {loss_sum / (i + 1):.4f} lr {epoch_lr:.4g} pruned {100 * pruned_sum / (i + 1):.1f}% "
                        f"{(i + 1) * args.batch_size / (time.time() - t_epoch):.0f} img/s ETA {eta / 60:.1f} min"
                        f"{mon.brief()}", flush=True)
            record = {"stage": stage, "level": level, "epoch": epoch + 1, "step": step,
                      "loss": loss_sum / steps_per_epoch, "lr": epoch_lr, "pruned": pruned_sum / steps_per_epoch,
                      "images_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch),
                      "val_loss": validate(student, teacher, bank, val_images, level, t, ctx=ctx), **mon.summary()}
            stage_log["epochs"].append(record)
            run.end_of_epoch(record, student, teacher, bank, optimizer, summary)
        losses = [e["loss"] for e in stage_log["epochs"]] or [float("nan")]
        say(f"== stage level {level} done: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    run.close()
    say(f"done in {(time.time() - t_run) / 60:.1f} min; backbones: {', '.join(summary['backbones']) or '-'}")
    return summary


@torch.no_grad()
def validate(student, teacher, bank, val_images, level, t, *, ctx):
    """Mean loss on the validation split at this level, pruner threshold t; no EMA, no enqueue (the authors'
    validation also updated the teacher and the bank, docs/METHOD.md §5; we do not). The same crops every epoch."""
    args, device, world = ctx.args, ctx.device, ctx.world
    if val_images is None or len(val_images) < ctx.batch * world:
        return None
    n = len(val_images) // (ctx.batch * world)
    n = min(n, args.val_steps) if args.val_steps else n
    loader, sampler = make_loader(val_images, level, num_samples=n * ctx.batch, seed=args.seed + 1, ctx=ctx)
    student.eval()
    teacher.eval()
    total = torch.zeros((), device=device)
    for item in device_batches(loader, device, ctx.views):
        x_q, x_k = to_views(item, ctx.views)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            q, k = student(x_q), teacher(x_k)
        total += ctx.criterion(q, k, bank.queue, args.temperature, t)
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.item() / (n * world)


# -----------------------------------------------------------------------------
# 9. Configuration: the command line. Flags left at None take their value from the preset (section 1); the
# argparse types of adam_cxr/runs.py check each flag when it is parsed.

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags come from the preset, and their help names its values."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = runs.Parser(description="Adam pretraining: coarse-to-fine contrastive learning of anatomy (MICCAI 2023).",
                    formatter_class=HelpFormatter)
    n0, n1 = runs.number(int, 0), runs.number(int, 1)               # argparse types: flags checked when parsed
    real, unit = runs.number(float, 0, 1e30), runs.number(float, 0, 1)   # 1e30: scaled, still a float32
    g = p.add_argument_group("data")
    g.add_argument("--data", default="phantom", help="'phantom' (generated on first use), 'chestxray14', 'eyepacs' "
                   "(caches made by data_prep.py), a cache folder, or any folder of PNG/JPEG images")
    g.add_argument("--data-root", default=None, help="where a named dataset lives (default data/<name>)")
    g.add_argument("--phantom-images", type=n1, default=1000, help="phantoms to generate when data/phantom is missing")
    g.add_argument("--workers", type=n0, default=None,
                   help="DataLoader workers per process (paper: 8, demo: 2); 0 = load in the main process")
    g.add_argument("--views", choices=["auto", "cpu", "device"], default="auto",
                   help="where both views are made: 'cpu' = per sample in the DataLoader workers (torchvision), "
                        "'device' = for the whole batch on the training device (adam_cxr/gpu_views.py; the workers "
                        "only read the parts; needs a data_prep.py cache); 'auto' = device when training on CUDA "
                        "from a cache, else cpu. `python bench.py train` times both (docs/gpu.md)")
    g.add_argument("--gpu-views", dest="views", action="store_const", const="device",
                   help="deprecated alias of --views device")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="fills every flag left unset; default: 'demo' for --data phantom, else 'paper'")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, choices=ARCHS, metavar="ARCH",
                   help=f"backbone: {', '.join(ARCHS)} (paper: resnet50)")
    g.add_argument("--img-size", type=runs.number(int, 16), default=None, help="side of each view (paper: 224)")
    g.add_argument("--dim", type=n1, default=128, help="embedding size D of q, k and the bank")
    g.add_argument("--bn-groups", type=n1, default=None, help="shuffle BN: BatchNorm over G groups of each process's "
                   "batch, regrouped for the teacher (default: a group per 64 images as the authors' GPUs, per 8 in "
                   "the demo preset; 1 = plain BN, which lets a small batch cheat through its statistics: "
                   "docs/learning.md)")
    g.add_argument("--crop-scale", type=runs.number(float, 0, 1, low_open=True), default=None,
                   help="views: smallest crop area as a share of the part (paper: 0.2, MoCo v2's)")
    g.add_argument("--jitter", type=runs.number(float, 0, 1), default=None,
                   help="views: brightness, contrast (and saturation) jitter strength, hue a quarter of it; 0 = none "
                        "(paper: 0.4; keep it below the contrast that tells images apart)")
    g = p.add_argument_group("method (paper Sect. 2)")
    g.add_argument("--levels", type=runs.levels, default="0,2,4",
                   help="granularity levels, one stage each, coarse to fine; '0' alone = MoCo-v2 (no AD)")
    g.add_argument("--queue-size", type=n1, default=None, help="bank size K (paper: 65536)")
    g.add_argument("--temperature", type=runs.number(float, 0, low_open=True), default=None,
                   help="tau of InfoNCE (paper: 0.2, MoCo-v2's; demo: 0.1)")
    g.add_argument("--threshold", type=runs.threshold, default=0.8, help="Purposive Pruner: bank entries with cosine "
                   ">= t to the anchor are dropped; t in (-1, 1]; 1 or 'off' disables the pruner (ablation 'no PP')")
    g.add_argument("--prune-every-level", action="store_true",
                   help="prune at level 0 too (the authors' code prunes only at levels > 0)")
    g.add_argument("--momentum-ema", type=unit, default=None, help="teacher EMA m (paper: 0.999)")
    g.add_argument("--loss", choices=["auto", "fused", "torch"], default="auto",
                   help="'fused' = the C++/CUDA op of adam_ext, 'torch' = the readable reference; "
                        "'auto' picks fused when it is built")
    g.add_argument("--tf32", action="store_true",
                   help="CUDA: allow TF32 in float32 matmuls, so the loss's bank products run on tensor cores "
                        "(the fused op's tc kernel, or cuBLAS for --loss torch); off: the loss stays exact fp32")
    g = p.add_argument_group("speed (the same training, other kernels; time each with `python bench.py train`)")
    g.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default="auto",
                   help="layout of the views and the convolutions; auto = channels_last on CUDA (what bf16 "
                        "convolutions run fastest in, per NVIDIA's guides), contiguous on CPU")
    g.add_argument("--fused-sgd", action="store_true",
                   help="SGD as one fused kernel (torch.optim.SGD(fused=True)) instead of torch's default "
                        "(foreach on CUDA: a few kernels per group of tensors)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the student and the teacher; where compiling fails they run eagerly (one "
                        "warning). The first steps take minutes to compile: worth it for long runs only")
    g = p.add_argument_group("optimisation (authors' code: SGD, cosine per stage)")
    g.add_argument("--epochs", type=n1, default=None, help="epochs per stage (paper: 200)")
    g.add_argument("--steps-per-epoch", type=n1, default=None,
                   help="cap on steps per epoch, for smoke runs (default: the whole train split)")
    g.add_argument("--batch-size", type=runs.number(int, 2, why="BatchNorm trains on a batch's statistics"),
                   default=None, help="global batch over all processes (paper: 256)")
    g.add_argument("--lr", type=real, default=None, help="learning rate for batch 256, scaled linearly (paper: 0.03)")
    g.add_argument("--wd", type=real, default=1e-4, help="weight decay")
    g.add_argument("--momentum", type=unit, default=0.9, help="SGD momentum")
    g.add_argument("--val-steps", type=n0, default=None,
                   help="validation batches per epoch (no teacher/bank update); 0 = off, default all")
    g = p.add_argument_group("run")
    g.add_argument("--device", type=runs.device, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=runs.seed, default=0)
    g.add_argument("--out", type=runs.out_folder, default="runs/adam",
                   help="run folder: checkpoint.pth, log.jsonl, backbones")
    g.add_argument("--resume", default=None,
                   help="run folder to continue from; flags you pass again override the saved ones")
    g.add_argument("--overwrite", action="store_true", help="replace the run that --out holds (its files are deleted)")
    g.add_argument("--print-freq", type=n1, default=None, help="progress line every N steps")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars (loss, lr, pruned fraction, val loss, images/s) to OUT/tb; "
                        "needs the tensorboard package (pip install tensorboard)")
    args = p.parse_args(argv)
    if args.resume:  # the saved flags become the defaults; what the user passes again wins
        ckpt = runs.load_checkpoint(Path(args.resume) / "checkpoint.pth", keys=runs.CHECKPOINT_KEYS)
        saved = {k: v for k, v in ckpt["args"].items() if k not in ("resume", "out", "overwrite")}
        if saved.pop("gpu_views", False):  # runs saved before --views had --gpu-views
            saved.setdefault("views", "device")
        saved.setdefault("bn_group_images", 64)  # runs saved before the presets set it: a group per 64 images
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        given = sys.argv[1:] if argv is None else argv
        args.out = args.out if "--out" in given else args.resume
    preset = PRESETS[args.preset or ("demo" if args.data == "phantom" else "paper")]
    for key, value in preset.items():  # bn_group_images is no flag: --bn-groups left unset follows it
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.level_list = [int(n) for n in str(args.levels).split(",")]
    if args.resume:  # the saved run must fit: arch, dim, K, the levels and epochs it has done
        runs.check_resume(args, ckpt)
    return args


# -----------------------------------------------------------------------------
# 10. Plumbing: devices, the loss path, data sources and loaders (checkpoints and exports: adam_cxr/runs.py).

@dataclass
class Context:
    """What the training step, validate() and the loaders share, built once in main() (and by bench.py pipeline)."""
    args: argparse.Namespace       # the flags (parse_args)
    device: torch.device
    rank: int = 0                  # this process among world (torchrun)
    world: int = 1
    views: object = None           # BatchViews for --views device; None: the loader's workers make the views
    criterion: object = None       # the loss function (choose_loss): info_nce or the fused op

    @property
    def batch(self):               # per process
        return self.args.batch_size // self.world


def setup_devices(args):
    """Returns (device, rank, world). torchrun sets WORLD_SIZE; gloo on CPU, nccl on CUDA. --tf32 on CUDA."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and world > 1:
        want = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(want)
    if device.type == "cuda":  # an index is needed by set_device (and keeps every later .to() on this GPU)
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
        if args.tf32:  # the op's launcher reads the same flag (csrc/info_nce_cuda.cu)
            torch.backends.cuda.matmul.allow_tf32 = True
            if rank == 0:
                print("tf32: float32 matmuls may use TF32 (the loss's bank products on tensor cores)")
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


def choose_loss(flag, device, say):
    """--loss auto|fused|torch -> the loss function: info_nce (section 6) or the fused op adam_ext.info_nce. adam_ext
    decides: it knows what it was built for, and it checks its kernels against info_nce on this device first
    (adam_ext/selfcheck.py)."""
    try:
        import adam_ext
    except ImportError as e:  # an install without the op's package: the reference is the whole method
        if flag == "fused":
            raise ValueError(f"--loss fused: adam_ext is not importable ({e}); use --loss torch") from None
        say(f"loss: pure-PyTorch reference ({flag}; adam_ext not importable: {e})")
        return info_nce
    return adam_ext.choose_path(flag, device, reference=info_nce, say=say)


def loss_record(criterion):
    """For args.json (adam_cxr/runs.py): which loss function trains, and what the fused op was built for."""
    try:
        import adam_ext
        build = adam_ext.build_info()
    except ImportError as e:
        build = f"not importable ({e})"
    return {"loss": "pure-PyTorch reference" if criterion is info_nce else "fused adam_ext op", "adam_ext": build}


def build_models(args, device, world, batch):
    """Student (f_theta, h_theta), teacher (its copy, section 4), bank (section 5), and what the step calls: model
    (the student, under DDP across processes, compiled with --compile), the teacher as called; the shuffle-BN groups
    (bn_groups: the preset's images a group, per process, section 7) and the views' memory format."""
    groups = bn_groups(args, batch)
    student = Encoder(args.arch, args.dim, groups).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)         # xi initialised as a copy of theta
    cuda = device.type == "cuda"
    layout = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format,
              "auto": torch.channels_last if cuda else torch.contiguous_format}[args.memory_format]
    student, teacher = student.to(memory_format=layout), teacher.to(memory_format=layout)
    bank = MemoryBank(args.queue_size, args.dim, device, torch.Generator().manual_seed(args.seed))
    model = nn.parallel.DistributedDataParallel(student, device_ids=[device] if cuda else None) \
        if world > 1 else student
    teacher_fwd = teacher
    if args.compile:
        import torch._dynamo as dynamo
        dynamo.config.suppress_errors = True  # what fails to compile runs eagerly, with a warning
        model, teacher_fwd = torch.compile(model), torch.compile(teacher)
    return student, teacher, bank, model, teacher_fwd, groups, layout


def make_optimizer(student, lr, args):
    """The authors' SGD (momentum, weight decay); --fused-sgd: torch's fused kernel, else its default."""
    return torch.optim.SGD(student.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.wd,
                           fused=args.fused_sgd or None)


def open_data(args, world, device):
    """--data -> (train images, validation images or None, BatchViews for device views or None), checked against
    --batch-size, --views and --levels. Under torchrun rank 0 generates a missing phantom, the others wait."""
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    wait = args.data == "phantom" and dist.is_initialized()
    if wait and dist.get_rank() > 0:
        dist.barrier()
    train_images = data_prep.open_images(args.data, args.data_root, "train", args.phantom_images)
    if wait and dist.get_rank() == 0:
        dist.barrier()
    if len(train_images or ()) < args.batch_size:
        raise ValueError(f"--data {args.data}: train split has {len(train_images or ())} images, fewer than "
                         f"--batch-size {args.batch_size}")
    cache = isinstance(train_images, data_prep.CacheImages)
    views = None
    if args.views == "device" or (args.views == "auto" and device.type == "cuda" and cache):
        if not cache:  # both views of a batch made on the training device, from parts of one size
            raise ValueError(f"--views device needs a data_prep.py cache (images of one size); --data {args.data} is "
                             f"a folder: prepare it with `python data_prep.py folder --src {args.data} --out <cache>`")
        views = BatchViews(args.img_size, args.crop_scale, args.jitter)
    (h, w), n = train_images[0].shape[1:], max(args.level_list)   # our floor: finest parts >= 1/4 of the view
    if min(h >> (n // 2), w >> ((n + 1) // 2)) < args.img_size / 4:
        raise ValueError(f"--levels {args.levels}: level {n} cuts the {h}x{w} images of --data {args.data} into parts "
                         f"of {h >> (n // 2)}x{w >> ((n + 1) // 2)} px, under 1/4 of --img-size {args.img_size}: use "
                         f"coarser levels, a smaller --img-size, or larger images")
    val = data_prep.open_images(args.data, args.data_root, "val", args.phantom_images) if args.val_steps != 0 else None
    return train_images, val, views


def make_loader(images, level, *, num_samples, seed, ctx):
    """(DataLoader, PartSampler) of num_samples (index, seed) samples of this process's shard at this level: AdamViews
    (ctx.views: BatchViews for device views), in pinned memory where there is CUDA."""
    a = ctx.args
    return loader_of(AdamViews(images, level, a.img_size, ctx.views, a.crop_scale, a.jitter), num_samples=num_samples,
                     seed=seed, ctx=ctx)


def loader_of(dataset, *, num_samples, seed, ctx):
    """A loader of `dataset`, which takes the PartSampler's (index, seed) items (baselines.py and semgen.py pass
    theirs): -> (loader, sampler). The sampler's set_epoch(stage, epoch) picks the epoch's permutation."""
    args = ctx.args
    sampler = PartSampler(len(dataset), num_samples, seed, ctx.rank, ctx.world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=ctx.batch, sampler=sampler, num_workers=args.workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None)
    return loader, sampler


def device_batches(loader, device, views=None):
    """The loader's batches with their tensors on `device`; with device views (views: BatchViews) the views'
    parameters stay on the host, pinned (BatchViews reads them there). On CUDA each batch is copied from pinned
    memory, non_blocking, on a side stream, and the next batch's copy is issued before this one is handed out, so
    that it runs during this step."""
    if device.type != "cuda":
        yield from loader
        return
    host = 1 if views is not None else None  # the position of the parameters in a device-views batch
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)

    def copy_ahead(item):
        with torch.cuda.stream(side):
            return [x if i == host else x.to(device, non_blocking=True) for i, x in enumerate(item)]

    def hand_over(batch):
        current.wait_stream(side)  # its copy ends before the step's kernels start (the device waits, not the host)
        for i, x in enumerate(batch):
            if i != host:
                x.record_stream(current)  # made on `side`, used on `current`: not reused before the step ends
        return batch

    ready = None
    for item in loader:
        batch = hand_over(ready) if ready is not None else None
        ready = copy_ahead(item)   # issued after the wait: overlaps the step that uses `batch`
        if batch is not None:
            yield batch
    if ready is not None:
        yield hand_over(ready)


def to_views(item, views, memory_format=torch.preserve_format):
    """A batch on its device (device_batches) -> (x_q, x_k), B x 3 x S x S float, normalised, in memory_format: the
    workers' uint8 views, or with device views (parts, parameters of both views) -> BatchViews, for the whole batch."""
    # [0, 1]; uint8 / 255 as torchvision's ToDtype(scale=True) computes it (x * (1 / 255)), to the last bit
    x_q, x_k = views.make(*item) if views is not None else (x.float().mul_(1.0 / 255) for x in item)
    return tuple(imagenet_normalise(x).to(memory_format=memory_format) for x in (x_q, x_k))


if __name__ == "__main__":
    try:  # bad input, a full disk, a busy --out, Ctrl-C or SIGTERM: one line, no traceback
        runs.command_line("adam.py", main, (OSError, ValueError, DataError),
                          note=lambda: runs.again(parse_args().out))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
