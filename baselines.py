"""
The paper's baselines on Adam's terms: DenseCL and VICRegL built from lightly's losses, heads and transforms, and the
one loop that pretrains them and Semantic Genesis (semgen.py) with adam.py's data, backbone, presets, step budget,
seeds and run folder, so that finetune.py, eve.py and ablate.py take their encoders as they take Adam's.

    python baselines.py densecl --out runs/densecl                    # the CPU demo preset on the phantoms
    python baselines.py vicregl --data chestxray14 --out runs/vicregl # the paper preset on a data_prep.py cache
    python baselines.py semgen --out runs/semgen                      # Semantic Genesis 2D (semgen.py)
    python finetune.py --task phantom-heart --init adam:runs/densecl --init random

DenseCL and VICRegL need lightly (pip install '.[baselines]'); Semantic Genesis does not. The methods' spec, and
where they differ from their papers, is docs/METHOD.md §10 and §11; docs/baselines.md is the user's page.

Sections:
  1. configuration   one parser per method: adam.py's data / model / optimisation / run flags and presets, plus the
                     method's own flags; flags_for() fits one scale's adam.py command line to a method (ablate.py)
  2. DenseCL         lightly's DenseCLProjectionHead (global and dense), NTXentLoss with memory banks,
                     select_most_similar; Adam's views of whole images, Adam's EMA teacher and shuffle BN
  3. VICRegL         lightly's VICRegLTransform (views + grids), BarlowTwinsProjectionHead, VicRegLLocalProjectionHead,
                     VICRegLLoss
  4. the loop        train(): one stage, SGD with a cosine schedule per epoch, validation, the run folder's files
                     (log.jsonl, checkpoint.pth, adam_<arch>_level0[_best].pth exports), resume
"""
import contextlib
import copy
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

# As adam.py: sleeping OpenMP waits, set before torch loads libgomp (BENCHMARKS.md, "an OpenMP pitfall").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn

import adam
import semgen  # Semantic Genesis 2D: its model and flags, trained by this file's loop
from adam_cxr import runs
from data_prep import DataError

METHODS = ("densecl", "vicregl", "semgen")


def require_lightly(method):
    """lightly is the optional extra [baselines]: its absence is one line naming the install."""
    try:
        import lightly  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{method}: DenseCL and VICRegL are built from lightly's losses, heads and transforms, "
                         f"which are not importable here ({e}): pip install '.[baselines]'") from None


# -----------------------------------------------------------------------------
# 1. Configuration. The flags adam.py and these methods share keep adam.py's names, defaults and presets
# (adam.PRESETS: "demo" on the phantoms, "paper" elsewhere), so one scale of ablate.py fits every method.

def parser(method):
    """The parser of one method: adam.py's shared flags, then the method's group (semgen.py adds its own)."""
    prog = f"baselines.py {method}"
    p = runs.Parser(prog=prog, formatter_class=adam.HelpFormatter, description={
        "densecl": "DenseCL (Wang et al., CVPR 2021) from lightly's pieces, on Adam's data, views and budget.",
        "vicregl": "VICRegL (Bardes et al., NeurIPS 2022) from lightly's pieces, on Adam's data and budget.",
        "semgen": "Semantic Genesis 2D (Haghighi et al., MICCAI 2020): self-discovery, self-classification and "
                  "self-restoration of anatomical patterns, on Adam's data and budget."}[method])
    n0, n1 = runs.number(int, 0), runs.number(int, 1)
    real, unit = runs.number(float, 0, 1e30), runs.number(float, 0, 1)
    g = p.add_argument_group("data (as adam.py)")
    g.add_argument("--data", default="phantom", help="'phantom', 'chestxray14', 'eyepacs', a cache folder, or a "
                   "folder of PNG/JPEG images (adam.py --data)")
    g.add_argument("--data-root", default=None, help="where a named dataset lives (default data/<name>)")
    g.add_argument("--phantom-images", type=n1, default=1000, help="phantoms to generate when data/phantom is missing")
    g.add_argument("--workers", type=n0, default=None, help="DataLoader workers (paper: 8, demo: 2); 0 = main process")
    g.add_argument("--preset", choices=list(adam.PRESETS), default=None,
                   help="fills every flag left unset; default: 'demo' for --data phantom, else 'paper'")
    g = p.add_argument_group("model (as adam.py)")
    g.add_argument("--arch", default=None, choices=adam.ARCHS, metavar="ARCH",
                   help=f"backbone: {', '.join(adam.ARCHS)} (paper: resnet50)")
    g.add_argument("--img-size", type=runs.number(int, 32), default=None, help="side of each view (paper: 224)")
    g = p.add_argument_group("optimisation (as adam.py: SGD, cosine per epoch, one stage)")
    g.add_argument("--epochs", type=n1, default=None, help="epochs (paper preset: 200)")
    g.add_argument("--steps-per-epoch", type=n1, default=None, help="cap on steps per epoch (default: the whole set)")
    g.add_argument("--batch-size", type=n1, default=None, help="batch (paper: 256)")
    g.add_argument("--lr", type=real, default=None, help="learning rate for batch 256, scaled linearly (paper: 0.03)")
    g.add_argument("--wd", type=real, default=1e-4, help="weight decay")
    g.add_argument("--momentum", type=unit, default=0.9, help="SGD momentum")
    g.add_argument("--val-steps", type=n0, default=None, help="validation batches per epoch; 0 = off, default all")
    g = p.add_argument_group("run (as adam.py)")
    g.add_argument("--device", type=runs.device, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=0, help="the backbone starts as adam.py's does with this seed")
    g.add_argument("--out", default=f"runs/{method}", help="run folder: checkpoint.pth, log.jsonl, backbones")
    g.add_argument("--resume", default=None, help="run folder to continue from; flags passed again override")
    g.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    g.add_argument("--print-freq", type=n1, default=None, help="progress line every N steps")
    if method == "densecl":
        g = p.add_argument_group("DenseCL (docs/METHOD.md §10.1; MoCo-v2's settings, as adam.py's level 0)")
        g.add_argument("--gpu-views", action="store_true", help="make the views on the training device (adam.py "
                       "--gpu-views); needs a data_prep.py cache")
        g.add_argument("--dim", type=n1, default=128, help="embedding size of both heads and both banks")
        g.add_argument("--queue-size", type=n1, default=None, help="size K of each bank (paper: 65536)")
        g.add_argument("--temperature", type=runs.number(float, 0, low_open=True), default=None,
                       help="tau (default: the preset's, as adam.py)")
        g.add_argument("--momentum-ema", type=unit, default=None, help="teacher EMA m (paper: 0.999)")
        g.add_argument("--bn-groups", type=n1, default=None, help="shuffle BN groups (adam.py --bn-groups)")
        g.add_argument("--dense-weight", type=unit, default=0.5,
                       help="lambda: loss = (1 - lambda) L_global + lambda L_dense (DenseCL: 0.5)")
    elif method == "vicregl":
        g = p.add_argument_group("VICRegL (docs/METHOD.md §10.2)")
        g.add_argument("--alpha", type=unit, default=0.75,
                       help="loss = alpha L_global + (1 - alpha) L_local (lightly's default)")
        g.add_argument("--expander", type=n1, default=None, help="width of the global head's three layers (default: "
                       "4 x the backbone's: 8192 for ResNet-50, lightly's default); its covariance costs O(width^2)")
    else:
        semgen.add_flags(p)
    return p


def parse_args(argv, method):
    p = parser(method)
    args = p.parse_args(argv)
    if args.resume:  # the saved flags become the defaults; what the user passes again wins (as adam.py)
        ckpt = runs.load_checkpoint(Path(args.resume) / "checkpoint.pth", keys=CHECKPOINT_KEYS)
        if ckpt["method"] != method:
            raise ValueError(f"--resume {args.resume} holds a {ckpt['method']} run, not {method}")
        p.set_defaults(**{k: v for k, v in ckpt["args"].items() if k not in ("resume", "out", "overwrite")})
        args = p.parse_args(argv)
        args.out = args.out if "--out" in argv else args.resume
    preset = adam.PRESETS[args.preset or ("demo" if args.data == "phantom" else "paper")]
    for key, value in preset.items():
        if getattr(args, key, 0) is None:
            setattr(args, key, value)
    args.method = method
    args.levels, args.level_list = "0", [0]               # one stage on whole images (adam.open_data checks the size)
    args.gpu_views = getattr(args, "gpu_views", False)
    args.views = "device" if args.gpu_views else "cpu"    # adam.open_data's --views
    args.crop_scale, args.jitter = preset["crop_scale"], preset["jitter"]   # the preset's views, as adam.py's
    args.bn_group_images = preset["bn_group_images"]                        # and its shuffle-BN groups
    args.tf32 = False                                     # adam.setup_devices reads it
    return args


def flags_for(method, argv):
    """argv without the flags `method` does not take (adam.py's contrastive flags for VICRegL and Semantic Genesis,
    --gpu-views for the methods whose views are not Adam's): one scale's adam.py command line for every method.
    Returns (kept, dropped)."""
    known = parser(method)._option_string_actions
    kept, dropped, i = [], [], 0
    while i < len(argv):
        if argv[i] in known:
            n = 1 if known[argv[i]].nargs == 0 else 2
            kept += argv[i:i + n]
        else:                                        # a flag of adam.py's, with its value unless it is a switch
            n = 2 if i + 1 < len(argv) and not argv[i + 1].startswith("--") else 1
            dropped += argv[i:i + n]
        i += n
    return kept, dropped


@contextlib.contextmanager
def seeded(seed):
    """torch, numpy and random seeded for one sample and restored afterwards: lightly's transforms draw from all
    three, and a sample must look the same whatever the number of workers, and after a resume (adam.AdamViews)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def feature_side(img_size):
    """Side of a ResNet's last map for img_size inputs: five stride-2 stages, each ceil(n / 2)."""
    for _ in range(5):
        img_size = (img_size + 1) // 2
    return img_size


# -----------------------------------------------------------------------------
# 2. DenseCL (Wang, Zhang, Shen, Kong, Li, CVPR 2021; docs/METHOD.md §10.1): MoCo-v2 plus a dense head whose
# vectors, one per cell of the last map, are contrasted with the key's vector at the most similar cell.

def densecl_loss(f_q, q, q_dense, f_k, k, k_dense, loss_global, loss_dense, weight):
    """(1 - lambda) L_global + lambda L_dense. f: B x hw x C backbone features, q, k: B x D, q_dense, k_dense:
    B x hw x D. Each query cell's positive is the key's dense vector at the cell whose backbone feature is most
    similar by cosine (lightly's select_most_similar); both losses are lightly's NTXentLoss against their banks."""
    from lightly.models import utils
    k_match = utils.select_most_similar(f_q.detach(), f_k, k_dense)              # B x hw x D
    l_global = loss_global(q, k)
    l_dense = loss_dense(q_dense.flatten(0, 1), k_match.flatten(0, 1))         # (B hw) x D each
    return (1 - weight) * l_global + weight * l_dense, {"loss_global": l_global.item(), "loss_dense": l_dense.item()}


class DenseCL(nn.Module):
    def __init__(self, args, views=None):
        super().__init__()
        require_lightly("densecl")
        from lightly.loss import NTXentLoss
        from lightly.models.modules import DenseCLProjectionHead
        self.groups = adam.bn_groups(args, args.batch_size)           # adam.py's shuffle-BN groups
        encoder = adam.Encoder(args.arch, args.dim, self.groups)      # first: the backbone adam.py starts from
        self.backbone, width = encoder.backbone, encoder.head[0].in_features
        self.head_global = DenseCLProjectionHead(width, width, args.dim)
        self.head_dense = DenseCLProjectionHead(width, width, args.dim)   # on each cell: a 1x1-conv MLP
        student = nn.ModuleList([self.backbone, self.head_global, self.head_dense])
        self.teacher = copy.deepcopy(student).requires_grad_(False)      # xi initialised as a copy of theta
        self.loss_global = NTXentLoss(args.temperature, memory_bank_size=(args.queue_size, args.dim))
        self.loss_dense = NTXentLoss(args.temperature, memory_bank_size=(args.queue_size, args.dim))
        self.m, self.weight, self.views, self.img_size = args.momentum_ema, args.dense_weight, views, args.img_size

    def dataset(self, images, split):
        return adam.AdamViews(images, 0, self.img_size, self.views)                # MoCo-v2's row: level 0

    @staticmethod
    def embed(nets, x):
        """(backbone, global head, dense head), B x 3 x S x S -> (features B x hw x C, global B x D,
        dense B x hw x D)"""
        f = adam.feature_map(nets[0], x).flatten(2).transpose(1, 2)            # B x hw x C
        return f, nets[1](f.mean(1)), nets[2](f)

    def forward_loss(self, item, device, layout):
        x_q, x_k = adam.to_views(item, self.views, layout)                         # B x 3 x S x S each
        f_q, q, q_dense = self.embed((self.backbone, self.head_global, self.head_dense), x_q)
        with torch.no_grad():  # the teacher's batch in shuffle BN order (adam.teacher_keys), then back
            perm = adam.shuffle_groups(x_k.shape[0], self.groups).to(device) if self.groups > 1 else None
            keys = self.embed(self.teacher, x_k if perm is None else x_k[perm])
            f_k, k, k_dense = keys if perm is None else (t[perm.argsort()] for t in keys)
        with torch.autocast(device.type, enabled=False):  # the loss in float32, as adam.py's
            return densecl_loss(f_q.float(), q.float(), q_dense.float(), f_k.float(), k.float(), k_dense.float(),
                                self.loss_global, self.loss_dense, self.weight)

    @torch.no_grad()
    def after_step(self):
        """xi <- m xi + (1 - m) theta for backbone and both heads (lightly's update_momentum; adam.ema_update)."""
        from lightly.models import utils
        for student, teacher in zip((self.backbone, self.head_global, self.head_dense), self.teacher):
            utils.update_momentum(student, teacher, self.m)

    # lightly keeps its banks in non-persistent buffers: the checkpoint carries them here, so a resume continues them
    def get_extra_state(self):
        return {name: {"bank": loss.memory_bank.bank.cpu(), "ptr": int(loss.memory_bank.bank_ptr)}
                for name, loss in (("global", self.loss_global), ("dense", self.loss_dense))}

    def set_extra_state(self, state):
        for name, loss in (("global", self.loss_global), ("dense", self.loss_dense)):
            loss.memory_bank.bank.copy_(state[name]["bank"])
            loss.memory_bank.bank_ptr.fill_(state[name]["ptr"])


# -----------------------------------------------------------------------------
# 3. VICRegL (Bardes, Ponce, LeCun, NeurIPS 2022; docs/METHOD.md §10.2): VICReg on the pooled features plus VICReg
# on the last map's cells, matched between the two views by feature distance and by location in the image.

class VICRegLViews(torch.utils.data.Dataset):
    """(index, seed) -> (view 1, view 2, grid 1, grid 2): lightly's VICRegLTransform of the whole image, two global
    views, no local ones (lightly's advice for ResNets). Its grid (each cell's centre in the image) only follows
    crops and flips, so Adam's rotation is left out; no flip, no greyscale, no solarisation (left and right matter,
    the images are grey); Adam's colour jitter and blur, the blur scaled with the view side as adam.AdamViews."""

    def __init__(self, images, img_size):
        from lightly.transforms.vicregl_transform import VICRegLTransform
        s = img_size / 224
        self.images = images
        self.transform = VICRegLTransform(
            global_crop_size=img_size, n_local_views=0, global_crop_scale=(0.2, 1.0),
            global_grid_size=feature_side(img_size), global_gaussian_blur_prob=0.5,
            global_gaussian_blur_sigmas=(0.1 * s, 2.0 * s), global_solarize_prob=0.0, hf_prob=0.0, vf_prob=0.0,
            cj_prob=0.8, cj_strength=1.0, cj_bright=0.4, cj_contrast=0.4, cj_sat=0.4, cj_hue=0.1, random_gray_scale=0.0)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        from PIL import Image
        index, seed = item
        with seeded(seed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*get_image_size", category=UserWarning)  # lightly's call
            x = self.images[index]                                               # C x H x W uint8
            image = Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)).convert("RGB")
            return tuple(self.transform(image))                 # 3 x S x S twice (ImageNet-normalised), g x g x 2 twice


class VICRegL(nn.Module):
    def __init__(self, args, views=None):
        super().__init__()
        require_lightly("vicregl")
        from lightly.loss import VICRegLLoss
        from lightly.models.modules import BarlowTwinsProjectionHead
        from lightly.models.modules.heads import VicRegLLocalProjectionHead
        encoder = adam.Encoder(args.arch, 128, 1)                     # first: the backbone adam.py starts from
        self.backbone, width = encoder.backbone, encoder.head[0].in_features
        # the paper's ResNet-50 heads: expander 8192-8192-8192, local 512-512-512; lightly's ResNet-18 example:
        # 2048-2048 and 128-128 - both are 4 x and 1/4 x the backbone's width
        expander = args.expander or 4 * width
        self.head_global = BarlowTwinsProjectionHead(width, expander, expander)
        self.head_local = VicRegLLocalProjectionHead(width, width // 4, width // 4)
        cells = feature_side(args.img_size) ** 2                      # VICRegL matches 20 and 4 of 7 x 7 cells
        self.criterion = VICRegLLoss(alpha=args.alpha, num_matches=(min(20, cells), min(4, cells)))
        self.img_size = args.img_size

    def dataset(self, images, split):
        return VICRegLViews(images, self.img_size)

    def embed(self, x):
        """B x 3 x S x S -> (global B x E, local B x h x w x d)"""
        f = adam.feature_map(self.backbone, x)                                 # B x C x h x w
        return self.head_global(f.mean((2, 3))).float(), self.head_local(f.permute(0, 2, 3, 1)).float()

    def loss(self, features, grids):
        """lightly's VICRegLLoss of two global views: features [(global, local)] x 2, grids B x h x w x 2 each."""
        return self.criterion(global_view_features=features, global_view_grids=grids)

    def forward_loss(self, item, device, layout):
        v1, v2 = (v.to(device, non_blocking=True, memory_format=layout) for v in item[:2])   # B x 3 x S x S
        g1, g2 = (g.to(device, non_blocking=True) for g in item[2:])                          # B x h x w x 2
        features = [self.embed(v1), self.embed(v2)]
        with torch.autocast(device.type, enabled=False):  # the loss in float32, as adam.py's
            return self.loss(features, [g1, g2]).squeeze(), {}

    def after_step(self):
        pass


# -----------------------------------------------------------------------------
# 4. The loop (docs/METHOD.md §10): adam.py's, for one stage. A method is an nn.Module with .backbone (a torchvision
# ResNet, fc = Identity: what the run exports), dataset(images, split) (items: the sampler's (index, seed)),
# forward_loss(item, device, layout) -> (loss, {name: float}) and after_step(). The backbone is built first after
# torch.manual_seed(seed), so every method starts from the backbone adam.py starts from with that seed.

CHECKPOINT_KEYS = ("args", "method", "epoch", "step", "model", "optimizer", "rng", "best")


def build(args, train_images, val_images, views, device, say):
    if args.method == "semgen":
        return semgen.SemanticGenesis(args, train_images, val_images, device, say)
    return {"densecl": DenseCL, "vicregl": VICRegL}[args.method](args, views)


def train(args, say=print):
    """Pretrain args.method into args.out -> {"out", "backbones", "best"}: adam.main's summary, which ablate.py
    reads."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError(f"{args.method} runs in one process: start it with python, not torchrun")
    device, _, _ = adam.setup_devices(args)
    train_images, val_images, views = adam.open_data(args, 1, device)
    out, cuda = Path(args.out), device.type == "cuda"
    layout = torch.channels_last if cuda else torch.preserve_format     # as adam.py: bf16 autocast + channels_last
    lock = runs.claim(args)                                              # OUT: one writer; another run refused
    try:
        torch.manual_seed(args.seed)
        model = build(args, train_images, val_images, views, device, say).to(device, memory_format=layout)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                    momentum=args.momentum, weight_decay=args.wd)
        epoch0, step, best = 0, 0, None
        if args.resume:
            ckpt = runs.load_checkpoint(Path(args.resume) / "checkpoint.pth", keys=CHECKPOINT_KEYS)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            epoch0, step, best = ckpt["epoch"], ckpt["step"], ckpt["best"]
            say(f"resuming {args.resume}: epoch {epoch0 + 1}, step {step}")
        loss = "semgen.semgen_loss" if args.method == "semgen" else f"{args.method}: lightly's losses (baselines.py)"
        runs.write_args_json(out, args, {"loss": loss, "adam_ext": None})
        train_set = model.dataset(train_images, "train")
        steps_per_epoch = min(len(train_set) // args.batch_size, args.steps_per_epoch or math.inf)
        if steps_per_epoch < (args.steps_per_epoch or 0):
            say(f"note: {len(train_set)} training samples give {steps_per_epoch} steps of batch {args.batch_size} "
                f"per epoch, fewer than --steps-per-epoch {args.steps_per_epoch}")
        loader, sampler = adam.loader_of(train_set, num_samples=steps_per_epoch * args.batch_size, seed=args.seed,
                                         ctx=adam.Context(args, device))
        lr = args.lr * args.batch_size / 256                                  # linear scaling rule
        say(f"{args.method}: data {train_images.name}, {len(train_set)} training samples; {args.arch} at "
            f"{args.img_size} px; {args.epochs} epochs x {steps_per_epoch} steps of batch {args.batch_size} on "
            f"{device.type}; lr {lr:g}")
        summary, t_run, steps_run = {"out": str(out), "backbones": [], "best": {}}, time.time(), 0
        for epoch in range(epoch0, args.epochs):
            epoch_lr = lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))   # cosine per epoch (adam.py)
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr
            sampler.set_epoch(0, epoch)
            model.train()
            t_epoch, sums = time.time(), {}
            for i, item in enumerate(adam.device_batches(loader, device, views)):   # on the device (adam.py)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss, scalars = model.forward_loss(item, device, layout)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.after_step()
                step, steps_run = step + 1, steps_run + 1
                if not math.isfinite(loss.item()):                               # diverged: stop before writing
                    raise runs.NonFinite(f"{args.method}: the loss is not finite in epoch {epoch + 1}, step {step}: "
                                         f"training diverged; lower --lr {args.lr:g}")
                for key, value in {"loss": loss.item(), **scalars}.items():
                    sums[key] = sums.get(key, 0.0) + value
                if (i + 1) % args.print_freq == 0 or i + 1 == steps_per_epoch:
                    eta = (time.time() - t_run) / steps_run * (args.epochs * steps_per_epoch - step)
                    say(f"{args.method} epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} "
                        + " ".join(f"{k} {v / (i + 1):.4f}" for k, v in sums.items())
                        + f" lr {epoch_lr:.4g} {(i + 1) * args.batch_size / (time.time() - t_epoch):.0f} img/s "
                          f"ETA {eta / 60:.1f} min", flush=True)
            record = {"stage": 0, "level": 0, "epoch": epoch + 1, "step": step, "lr": epoch_lr,
                      **{k: v / steps_per_epoch for k, v in sums.items()},
                      "images_per_s": steps_per_epoch * args.batch_size / (time.time() - t_epoch),
                      "val_loss": validate(model, val_images, args, device, layout)}
            best = end_of_epoch(record, model, optimizer, best, args, summary)
        say(f"{args.method} done in {(time.time() - t_run) / 60:.1f} min; backbones: "
            f"{', '.join(summary['backbones']) or '-'}")
        return summary
    finally:
        lock.release()


@torch.no_grad()
def validate(model, val_images, args, device, layout):
    """Mean loss on the validation split, the same samples every epoch; no bank update (lightly's NTXentLoss updates
    only with gradients), no EMA step. None without a validation split."""
    if val_images is None:                                    # none, or --val-steps 0 (adam.open_data)
        return None
    val_set = model.dataset(val_images, "val")
    n = len(val_set) // args.batch_size
    n = min(n, args.val_steps) if args.val_steps else n
    if n == 0:
        return None
    loader, _ = adam.loader_of(val_set, num_samples=n * args.batch_size, seed=args.seed + 1,
                               ctx=adam.Context(args, torch.device("cpu")))
    model.eval()
    total = 0.0
    for item in adam.device_batches(loader, device, getattr(model, "views", None)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            total += model.forward_loss(item, device, layout)[0].item()
    return total / n


def end_of_epoch(record, model, optimizer, best, args, summary):
    """The run folder after an epoch (adam_cxr/runs.py, as adam.py's): refuse a diverged state, then the log line,
    the export of the epoch with the lowest validation loss (adam_<arch>_level0_best.pth), the last epoch's export
    at the end, and the checkpoint. Returns the best epoch so far."""
    out, state = Path(args.out), model.state_dict()
    bad = runs.first_nonfinite(state)
    if bad:
        raise runs.NonFinite(f"{args.method}: {bad} is not finite after epoch {record['epoch']}: training diverged; "
                             f"lower --lr {args.lr:g}")
    val = record["val_loss"]
    improved = val is not None and math.isfinite(val) and (best is None or val < best["val_loss"])
    if improved:
        best = {"epoch": record["epoch"], "val_loss": val}
    record["best_epoch"] = best["epoch"] if best else None
    runs.append_log(out / "log.jsonl", record)
    if improved:
        summary["best"][0] = runs.export_backbone(model, out / runs.backbone_name(args.arch, 0, best=True))
    if record["epoch"] == args.epochs:
        summary["backbones"].append(runs.export_backbone(model, out / runs.backbone_name(args.arch, 0)))
    runs.save_checkpoint(out / "checkpoint.pth", args=dict(vars(args)), method=args.method, arch=args.arch,
                         epoch=record["epoch"], step=record["step"], model=state, optimizer=optimizer.state_dict(),
                         rng={"torch": torch.get_rng_state()}, best=best)
    return best


def main(argv=None):
    """baselines.py METHOD [flags] -> the run's summary."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in METHODS:
        raise ValueError(f"usage: baselines.py {{{','.join(METHODS)}}} [flags]; `baselines.py METHOD --help` lists "
                         f"the flags")
    if argv[0] != "semgen":
        require_lightly(argv[0])                              # before anything is read or made
    return train(parse_args(argv[1:], argv[0]))


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, DataError) as e:  # bad input, a full disk, a busy --out: one line, no traceback
        sys.exit(f"baselines.py: error: {str(e).strip().splitlines()[-1]}")
