"""
Adam: autodidactic dense anatomical models, the whole pretraining method in one file.

    Hosseinzadeh Taher, Gotway, Liang. "Towards Foundation Models Learned from Anatomy in Medical
    Imaging via Self-Supervision". MICCAI 2023 DART (arXiv 2309.15358).

Sections, in the order of the paper (Sect. 2, Fig. 2; the method's spec is docs/METHOD.md):
  1. configuration          argparse; defaults = the paper's and the authors' release
  2. Anatomy Decomposer     anatomy_parts(): level n -> 2^n boxes that tile the image
  3. views                  two augmented views of one random part per image; the part sampler
  4. encoder + EMA          student f_theta, h_theta; teacher f_xi, h_xi = EMA of the student
  5. memory bank            K x D ring buffer of the teacher's keys (the negatives)
  6. Purposive Pruner + InfoNCE   info_nce(): drop bank entries too similar to the anchor, then contrast
  7. teacher keys           shuffle BN: split BatchNorm in one process, a batch shuffle across processes
  8. training               main(): one stage per level (0 -> 2 -> 4) and the training step; validate()
  9. plumbing               devices, loss path, data, loaders (the run folder, checkpoints, export: adam_cxr/runs.py)

`python adam.py` runs the CPU demo on procedurally generated chest phantoms (preset "demo");
`python adam.py --data chestxray14` runs the paper's recipe (preset "paper"); `torchrun` runs it on
many GPUs (or CPU processes with gloo). See README.md.
"""
import argparse
import copy
import math
import os
import sys
import time
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
from adam_cxr import monitor  # the embedding monitor: what the pruner sees, alignment/uniformity, curves.png
from adam_cxr import runs  # the run folder: args.json, log.jsonl, checkpoints, exports, resume
from data_prep import DataError  # bad input data, named with its file

# -----------------------------------------------------------------------------
# 1. Configuration. Flags left at None take their value from the preset: "paper" reproduces the
# authors' settings (docs/METHOD.md §3-5), "demo" is a CPU-sized run of the same method.

PRESETS = {
    "paper": dict(arch="resnet50", img_size=224, batch_size=256, queue_size=65536, epochs=200, lr=0.03,
                  steps_per_epoch=None, momentum_ema=0.999, workers=8, val_steps=None, print_freq=50),
    # demo: ResNet-18 on 64 px views, ~100 steps per stage. A bank that fills within the first stage; m = 0.99
    # because a 0.999 teacher would barely move from its random init in 100 steps; base lr 0.24 so that
    # batch 32 trains at 0.03 (the linear scaling rule would give 0.004, too slow to show anything).
    "demo": dict(arch="resnet18", img_size=64, batch_size=32, queue_size=2048, epochs=5, lr=0.24,
                 steps_per_epoch=None, momentum_ema=0.99, workers=2, val_steps=2, print_freq=7),
}
# The backbones every script accepts (adam.py, finetune.py, eve.py): torchvision's ResNets.
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2")


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
    g.add_argument("--gpu-views", action="store_true",
                   help="make both views of the whole batch on the training device (adam_cxr/gpu_views.py) instead of per "
                        "sample in the CPU workers: use it when `python bench.py pipeline` shows the workers cannot "
                        "keep the GPU busy; needs a data_prep.py cache (images of one size)")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="fills every flag left unset; default: 'demo' for --data phantom, else 'paper'")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, choices=ARCHS, metavar="ARCH",
                   help=f"backbone: {', '.join(ARCHS)} (paper: resnet50)")
    g.add_argument("--img-size", type=runs.number(int, 16), default=None, help="side of each view (paper: 224)")
    g.add_argument("--dim", type=n1, default=128, help="embedding size D of q, k and the bank")
    g.add_argument("--bn-groups", type=n1, default=None, help="shuffle BN: BatchNorm over G groups of each process's "
                   "batch, regrouped for the teacher (default: 64 images a group as the authors' GPUs; 1 = plain BN)")
    g = p.add_argument_group("method (paper Sect. 2)")
    g.add_argument("--levels", type=runs.levels, default="0,2,4",
                   help="granularity levels, one stage each, coarse to fine; '0' alone = MoCo-v2 (no AD)")
    g.add_argument("--queue-size", type=n1, default=None, help="bank size K (paper: 65536)")
    g.add_argument("--temperature", type=runs.number(float, 0, low_open=True), default=0.2,
                   help="tau of InfoNCE (MoCo-v2: 0.2)")
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
    g.add_argument("--out", type=runs.out_folder, default="runs/adam", help="run folder: checkpoint.pth, log.jsonl, backbones")
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
        p.set_defaults(**{k: v for k, v in ckpt["args"].items() if k not in ("resume", "out", "overwrite")})
        args = p.parse_args(argv)
        given = sys.argv[1:] if argv is None else argv
        args.out = args.out if "--out" in given else args.resume
    preset = PRESETS[args.preset or ("demo" if args.data == "phantom" else "paper")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.level_list = [int(n) for n in str(args.levels).split(",")]
    if args.resume:  # the saved run must fit: arch, dim, K, the levels and epochs it has done
        runs.check_resume(args, ckpt)
    return args


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
# 3 channels only for the normalisation.

def imagenet_normalise(x):
    """... x C x H x W in [0, 1], C = 1 or 3 -> ... x 3 x H x W with ImageNet mean/std: grey becomes a
    3-channel copy (docs/METHOD.md §3). The one normalisation of pretraining, fine-tuning and Eve."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(3, 1, 1)
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
    """For sample (index, seed): one random part at `level` (the AD), then two augmented views of it.

    The seed comes from the sampler, so what a sample looks like does not depend on the number of
    workers, and a resumed run sees exactly the crops the uninterrupted run would have seen."""

    def __init__(self, images, level, img_size, gpu_views=False):
        self.images, self.level, self.gpu_views = images, level, gpu_views
        s = img_size / 224  # blur kernel and sigma scale with the view size (authors: 224 px)
        self.view = T.Compose([
            T.RandomResizedCrop(img_size, scale=(0.2, 1.0), antialias=True),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomApply([SeparableGaussianBlur(2 * round(11 * s) + 1, sigma=(0.1 * s, 2.0 * s))], p=0.5),
            T.RandomRotation(30),
            T.ToDtype(torch.float32, scale=True),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = torch.as_tensor(self.images[index])                           # C x H x W uint8
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


def shuffle_groups(B, G):
    """The teacher's order of a batch of B: image i (student group i % G, slot i // G) goes to teacher group
    (i + i // G) % G, so each teacher group takes B/G^2 images from every student group (G^2 | B), or one from each
    of B/G groups (B/G <= G), and no key shares its statistics with its query. Position p*G + h: h's p-th image."""
    i = torch.arange(B)
    return ((i % G + i // G) % G).argsort(stable=True).view(G, B // G).t().flatten()


@torch.no_grad()
def teacher_keys(teacher, x_k, groups=1):
    """k = h_xi(f_xi(x_k)). One process: the batch in shuffle_groups' order (G = 1: as it is, plain BN). Several:
    MoCo's shuffle BN, the batch permuted across ranks before the teacher (and split into G groups on each)."""
    if not dist.is_initialized():
        perm = shuffle_groups(x_k.shape[0], groups).to(x_k.device) if groups > 1 else None
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

def main(argv=None):
    args = parse_args(argv)
    device, rank, world = setup_devices(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    train_images, val_images, views = open_data(args, world)     # views: BatchViews for --gpu-views
    batch, out = args.batch_size // world, Path(args.out)          # batch: per process
    torch.manual_seed(args.seed)

    # models, bank, loss path; BatchNorm in groups of 64 images per process by default (section 7)
    groups = args.bn_groups or max(1, batch // 64)
    student = Encoder(args.arch, args.dim, groups).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)         # xi initialised as a copy of theta
    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.preserve_format  # bf16 autocast + channels_last on GPUs
    student, teacher = student.to(memory_format=layout), teacher.to(memory_format=layout)
    bank = MemoryBank(args.queue_size, args.dim, device, torch.Generator().manual_seed(args.seed))
    model = nn.parallel.DistributedDataParallel(student, device_ids=[device] if cuda else None) \
        if world > 1 else student
    fused = choose_loss(args.loss, device, say)
    lr = args.lr * args.batch_size / 256                           # linear scaling rule
    start_stage, start_epoch, step, ckpt = runs.resume(args, student, teacher, bank, say)
    run = runs.RunFolder(args, fused, rank == 0, ckpt,              # OUT: args.json, log, checkpoints, exports
                         runs.data_identity(train_images.name, getattr(train_images, "files", None)))
    steps_per_epoch = min(len(train_images) // args.batch_size, args.steps_per_epoch or math.inf)
    total_steps = len(args.level_list) * args.epochs * steps_per_epoch
    mon = monitor.Monitor(args.threshold, steps_per_epoch)        # similarities on a few anchors, a few steps
    say(f"data: {train_images.name}, {len(train_images)} train images; {args.arch} at {args.img_size} px; "
        f"levels {args.level_list}, {args.epochs} epochs x {steps_per_epoch} steps; batch {args.batch_size} "
        f"on {world} x {device.type}, BN groups {groups}; K={args.queue_size} tau={args.temperature} "
        f"t={args.threshold} m={args.momentum_ema}")
    if args.queue_size > 4 * len(train_images):  # the bank's negatives should be keys of other images (§4)
        say(f"WARNING: --queue-size {args.queue_size} is {args.queue_size / len(train_images):.0f}x the "
            f"{len(train_images)} train images: the bank holds many earlier keys of each anchor's own image, "
            f"contrasted as negatives; use a --queue-size below the number of train images, or more images")
    summary = {"out": str(out), "stages": [], "backbones": []}
    t_run, steps_run = time.time(), 0

    for stage in range(start_stage, len(args.level_list)):
        level = args.level_list[stage]
        prune = (level > 0 or args.prune_every_level) and args.threshold < 1  # >= 1 prunes nothing
        t = args.threshold if prune else None
        optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.wd)
        if ckpt is not None and stage == ckpt["stage"] and start_epoch > 0:
            optimizer.load_state_dict(ckpt["optimizer"])
        loader, sampler = make_loader(train_images, level, args, steps_per_epoch * batch, world, rank, args.seed, batch)
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
                    k = teacher_keys(teacher, x_k, groups)                 # B x D, no grad
                loss, pruned = info_nce(q, k, bank.queue, args.temperature, t, fused=fused, return_pruned=True)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema_update(teacher, student, args.momentum_ema)
                mon.observe(i, q, k, bank.queue)                           # the bank the loss saw
                bank.enqueue(all_gather(k))                                # after the loss (MoCo order)
                step, steps_run = step + 1, steps_run + 1
                loss_v, pruned_v = loss.item(), pruned.item()
                if not math.isfinite(loss_v):                              # diverged: stop before writing anything
                    raise runs.diverged("the loss", stage, level, epoch + 1, i + 1, args)
                loss_sum, pruned_sum = loss_sum + loss_v, pruned_sum + pruned_v
                stage_log["losses"].append(loss_v)
                run.step(step, loss=loss_v, pruned=pruned_v)
                if (i + 1) % args.print_freq == 0 or i + 1 == steps_per_epoch:
                    eta = (time.time() - t_run) / steps_run * (total_steps - step)
                    say(f"level {level} epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} "
                        f"loss {loss_sum / (i + 1):.4f} lr {epoch_lr:.4g} pruned {100 * pruned_sum / (i + 1):.1f}% "
                        f"{(i + 1) * args.batch_size / (time.time() - t_epoch):.0f} img/s ETA {eta / 60:.1f} min"
                        f"{mon.brief()}", flush=True)
            record = {"stage": stage, "level": level, "epoch": epoch + 1, "step": step,
                      "loss": loss_sum / steps_per_epoch, "lr": epoch_lr, "pruned": pruned_sum / steps_per_epoch,
                      "images_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch),
                      "val_loss": validate(student, teacher, bank, val_images, level, t, args, fused,
                                           device, world, rank, batch, views), **mon.summary()}
            stage_log["epochs"].append(record)
            run.end_of_epoch(record, student, teacher, bank, optimizer, summary)
        losses = [e["loss"] for e in stage_log["epochs"]] or [float("nan")]
        say(f"== stage level {level} done: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    run.close()
    say(f"done in {(time.time() - t_run) / 60:.1f} min; backbones: {', '.join(summary['backbones']) or '-'}")
    return summary


@torch.no_grad()
def validate(student, teacher, bank, val_images, level, t, args, fused, device, world, rank, batch, views=None):
    """Mean loss on the validation split at this level; no EMA, no enqueue (the authors' validation also
    updated the teacher and the bank, docs/METHOD.md §5; we do not). The same crops every epoch."""
    if val_images is None or len(val_images) < batch * world:
        return None
    n = len(val_images) // (batch * world)
    n = min(n, args.val_steps) if args.val_steps else n
    loader, sampler = make_loader(val_images, level, args, n * batch, world, rank, args.seed + 1, batch)
    student.eval()
    teacher.eval()
    total = torch.zeros((), device=device)
    for item in loader:
        x_q, x_k = to_views(item, views, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            q, k = student(x_q), teacher(x_k)
        total += info_nce(q, k, bank.queue, args.temperature, t, fused=fused)
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.item() / (n * world)


# -----------------------------------------------------------------------------
# 9. Plumbing: devices, the loss path, data sources and loaders (checkpoints and exports: adam_cxr/runs.py).

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
    """--loss auto|fused|torch -> use the fused op? adam_ext decides: it knows what it was built for, and it
    checks its kernels against info_nce on this device first (adam_ext/selfcheck.py)."""
    try:
        import adam_ext
    except ImportError as e:  # an install without the op's package: the reference is the whole method
        if flag == "fused":
            raise ValueError(f"--loss fused: adam_ext is not importable ({e}); use --loss torch") from None
        say(f"loss: pure-PyTorch reference ({flag}; adam_ext not importable: {e})")
        return False
    return adam_ext.choose_path(flag, device, reference=info_nce, say=say)


def open_data(args, world):
    """--data -> (train images, validation images or None, BatchViews for --gpu-views or None), checked against
    --batch-size, --gpu-views and --levels. Under torchrun rank 0 generates a missing phantom, the others wait."""
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
    views = None
    if args.gpu_views:  # both views of a batch made on the training device
        if not isinstance(train_images, data_prep.CacheImages):
            raise ValueError(f"--gpu-views needs a data_prep.py cache (images of one size); --data {args.data} is a "
                             f"folder: prepare it with `python data_prep.py folder --src {args.data} --out <cache>`")
        from adam_cxr.gpu_views import BatchViews  # imported only for --gpu-views
        views = BatchViews(args.img_size)
    (h, w), n = train_images[0].shape[1:], max(args.level_list)   # our floor: finest parts >= 1/4 of the view
    if min(h >> (n // 2), w >> ((n + 1) // 2)) < args.img_size / 4:
        raise ValueError(f"--levels {args.levels}: level {n} cuts the {h}x{w} images of --data {args.data} into parts "
                         f"of {h >> (n // 2)}x{w >> ((n + 1) // 2)} px, under 1/4 of --img-size {args.img_size}: use "
                         f"coarser levels, a smaller --img-size, or larger images")
    val = data_prep.open_images(args.data, args.data_root, "val", args.phantom_images) if args.val_steps != 0 else None
    return train_images, val, views


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
    if views is not None:
        item = views(item[0].to(device, non_blocking=True), *item[1:])
    return tuple(x.to(device, non_blocking=True, memory_format=memory_format) for x in item)


if __name__ == "__main__":
    sys.modules.setdefault("adam", sys.modules["__main__"])  # `import adam` (gpu_views.py) gets this module
    try:  # bad input, a full disk, a busy --out, Ctrl-C or SIGTERM: one line, no traceback
        runs.command_line("adam.py", main, (OSError, ValueError, DataError),
                          note=lambda: runs.again(parse_args().out))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
