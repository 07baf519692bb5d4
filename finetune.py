"""
Transfer a pretrained ResNet to downstream tasks: classification (ROC AUC), U-Net segmentation (Dice)
and few-shot segmentation, with the authors' protocol (docs/METHOD.md §7) and honest statistics.

    python finetune.py --task phantom-heart --init adam:runs/adam --init random --shots 3,6,12,24 --runs 5
    python finetune.py --task chestxray14 --data-root data/chestxray14 --init moco:moco_v2.pth.tar --runs 3

Starting points (--init, repeatable; "NAME=SPEC" gives a row its own name in the table):
    adam:PATH         adam.py's run folder (its last level's lowest-validation-loss export; RUN@last: the last
                      epoch's), its checkpoint.pth or an exported adam_<arch>_level<n>[_best].pth
    moco:PATH         MoCo-style checkpoint: {"state_dict": {"module.encoder_q.conv1.weight": ...}}
    torchvision:PATH  a torchvision ResNet state dict (its fc.* head is dropped)
    imagenet[:NAME]   torchvision's ImageNet weights for --arch through its weights API (NAME e.g. IMAGENET1K_V1;
                      default: the arch's DEFAULT), from the torch.hub cache or downloaded into it
    timm:PATH         a timm ResNet state dict (.pth / .bin, or .safetensors as on the Hugging Face hub)
    xrv:PATH          torchxrayvision ResNet weights: 1-channel conv1 and [-1024, 1024] input, converted to take
                      ImageNet-normalised 3-channel input
    random            torchvision's default initialisation
Every run writes one JSON record to OUT/results.json (a rerun skips the runs already there), a table
OUT/results.md that reads like the paper's Table 1 (mean +- std over runs, 95% t-interval, paired t-test
against the first --init on the same few-shot draws) and a plot OUT/results.png of metric vs shots. Each record
carries its settings and the identity of its data (adam_cxr.runs.data_identity); OUT holds one dataset and one set
of settings per task, and one starting point per --init name: a rerun that differs is refused, naming the flag.
"""
import argparse
import copy
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision import tv_tensors
from torchvision.transforms import v2

import data_prep
from adam import ARCHS, imagenet_normalise
from adam_cxr import runs
from adam_cxr.runs import backbone_file, first_nonfinite, load_checkpoint, write_atomic

# -----------------------------------------------------------------------------
# Loading pretrained backbones (shared with eve.py: keep the signature)

INIT_KINDS = ("adam", "moco", "torchvision", "imagenet", "timm", "xrv", "random")
# Said when a file does not fit --arch, per form.
INIT_HINTS = {
    "timm": " timm:PATH takes timm's plain ResNets (resnet18 ... resnet152, e.g. resnet50.a1_in1k), whose keys are "
            "torchvision's; variants with a deep stem or pooled shortcuts (resnet50d, resnet50s, ...) have other layers.",
    "xrv": " xrv:PATH takes torchxrayvision's ResNet weights (resnet50-res512-all: pass --arch resnet50); its "
           "DenseNets are pickled whole models, which weights_only loading refuses.",
    "imagenet": " The cached file does not hold torchvision's weights for this --arch: delete it to download again.",
}


def _resolve_adam_path(path, arch):
    """adam:RUN (a run folder) = the last level's backbone with the lowest validation loss, adam:RUN@last = its last
    epoch (runs.backbone_file, the run folder's own naming); a file is itself. Says which file it took."""
    path, which = Path(path), "best"
    if not path.exists() and path.name.rpartition("@")[2] in ("best", "last"):
        path, which = path.with_name(path.name.rpartition("@")[0]), path.name.rpartition("@")[2]
    if not path.is_dir():
        return path
    file, what = backbone_file(path, arch, which)
    print(f"--init adam:{path}{'@last' if which == 'last' else ''}: {file} ({what})", flush=True)
    return file


def _backbone_state(obj, path, arch):
    """Dig the backbone's torchvision-named tensors out of any supported checkpoint layout."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if isinstance(obj.get("arch"), str) and obj["arch"] != arch:
        raise ValueError(f"{path} holds a {obj['arch']} but --arch is {arch}: pass --arch {obj['arch']}")
    for wrapper in ("student", "state_dict", "model"):  # adam.py / MoCo / generic trainers
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}  # DataParallel
    # MoCo keeps both encoders (encoder_q, encoder_k) and the queue; adam.py keeps backbone + head.
    # Take the query / student backbone only.
    for prefix in ("encoder_q.", "backbone."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    # Drop projection / classification heads: fc.weight (linear) or fc.0 / fc.2 (MoCo-v2 MLP).
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _init_state(kind, path, arch):
    """(backbone state dict in torchvision's key names, where it came from) for one --init form."""
    if kind == "imagenet":
        return _imagenet_state(path, arch)
    if kind == "adam":
        path = _resolve_adam_path(path, arch)
    if kind == "timm" and str(path).endswith(".safetensors"):  # the hub's format: tensors only, no pickle
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"--init: reading {path} needs the safetensors package (pip install safetensors)") from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"--init: no checkpoint at {path}")
        obj = load_file(path)
    else:
        obj = load_checkpoint(path, "--init")
    sd = _backbone_state(obj, path, arch)
    if kind == "xrv":
        sd = xrv_to_imagenet_input(sd, path)
    return sd, path


def _imagenet_state(name, arch):
    """torchvision's ImageNet weights for `arch` through its weights API: the torch.hub cache
    ($TORCH_HOME/hub/checkpoints/<file of the weights' URL>) or a download into it, read with weights_only."""
    from torchvision.models import get_model_weights
    enum = get_model_weights(arch)
    try:
        weights = enum[name] if name else enum.DEFAULT
    except KeyError:
        raise ValueError(f"imagenet:{name}: {arch} has weights {[w.name for w in enum]}") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        sd = weights.get_state_dict(progress=True, weights_only=True)
    except Exception as e:  # offline, blocked or a broken file: say where the file goes
        raise ValueError(f"imagenet: could not read {weights} from {file} nor download it from {weights.url} "
                         f"({type(e).__name__}: {e}); with no network, put that file at {file}") from None
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}, f"{file} ({weights})"


def xrv_to_imagenet_input(sd, path="xrv"):
    """torchxrayvision's ResNets take one channel scaled to [-1024, 1024]: x' = 2048 g - 1024 for grey g in [0, 1]
    (xrv.datasets.normalize). Our backbones take the grey image on 3 channels through imagenet_normalise:
    x_c = (g - mean_c) / std_c. With W_c = W' 2048 std_c / 3, sum_c W_c * x_c = 2048 W' * g - 2048 mean(mean_c) sum(W'),
    which differs from W' * x' = 2048 W' * g - 1024 sum(W') by a constant per output channel, folded into bn1's
    running mean. Exact wherever conv1's 7x7 window stays inside the image; in the 3-pixel border the zero padding
    stands for g = 0.5 in xrv's input and g = mean_c in ours, so the border responses differ slightly."""
    w1 = sd.get("conv1.weight")
    if w1 is None or w1.dim() != 4 or w1.shape[1] != 1:
        got = "no conv1.weight" if w1 is None else f"conv1.weight {tuple(w1.shape)}"
        raise ValueError(f"xrv:{path}: {got}, not torchxrayvision's 1-channel conv1; a 3-channel torchvision "
                         f"ResNet is torchvision:PATH.{INIT_HINTS['xrv']}")
    if "bn1.running_mean" not in sd:
        raise ValueError(f"xrv:{path}: no bn1.running_mean, so this is not a torchvision-layout ResNet."
                         f"{INIT_HINTS['xrv']}")
    f0 = imagenet_normalise(torch.zeros(1, 1, 1, dtype=torch.float64)).view(1, 3, 1, 1)  # -mean_c / std_c
    f1 = imagenet_normalise(torch.ones(1, 1, 1, dtype=torch.float64)).view(1, 3, 1, 1)   # (1 - mean_c) / std_c
    std = 1 / (f1 - f0)
    mean = -f0 * std
    w1, sd = w1.double(), dict(sd)
    sd["conv1.weight"] = (w1 * 2048 * std / 3).to(sd["conv1.weight"].dtype)
    offset = (2048 * mean.mean() - 1024) * w1.sum((1, 2, 3))           # desired - converted, per output channel
    sd["bn1.running_mean"] = (sd["bn1.running_mean"].double() - offset).to(sd["bn1.running_mean"].dtype)
    return sd


def load_backbone(init: str, arch: str = "resnet50") -> nn.Module:
    """torchvision ResNet with fc = nn.Identity(), initialised from `init` (see module docstring)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose from {ARCHS}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    kind, _, path = init.partition(":")
    if kind == "random" and not path:
        return model
    if kind not in INIT_KINDS or not path and kind != "imagenet":
        raise ValueError(f"bad --init {init!r}: use adam:PATH, moco:PATH, torchvision:PATH, imagenet, timm:PATH, "
                         f"xrv:PATH or random")
    sd, path = _init_state(kind, path, arch)
    bad = first_nonfinite(sd)
    if bad:  # a diverged run's weights: refused, not trained on
        raise ValueError(f"{init}: {path}: {bad} holds NaN or infinite values (the run that wrote it diverged)")
    want = model.state_dict()
    # Old checkpoints may lack BatchNorm's num_batches_tracked counters; they carry no learned weights.
    for k in want:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = want[k]
    missing = [k for k in want if k not in sd]
    shaped = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}"
              for k in want if k in sd and sd[k].shape != want[k].shape]
    extra = [k for k in sd if k not in want]
    if missing or shaped or extra:
        parts = []
        for name, keys in (("missing", missing), ("mis-shaped", shaped), ("unexpected", extra)):
            if keys:
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        raise ValueError(f"{init}: {path} does not hold a complete {arch} backbone ({'; '.join(parts)}). "
                         f"Is --arch right, and is this a {kind} checkpoint?{INIT_HINTS.get(kind, '')}")
    model.load_state_dict(sd)
    return model


# -----------------------------------------------------------------------------
# Tasks and presets

# name -> kind, cache dataset, default root, what to predict
TASKS = {
    "chestxray14":      dict(kind="cls", loss="bce", dataset="chestxray14", root="data/chestxray14", preset="gpu"),
    "eyepacs":          dict(kind="cls", loss="ce", dataset="eyepacs", root="data/eyepacs", preset="gpu"),
    "phantom-findings": dict(kind="cls", loss="bce", dataset="phantom", root="data/phantom", preset="cpu"),
    "phantom-heart":    dict(kind="seg", structures=("heart",), dataset="phantom", root="data/phantom", preset="cpu"),
    "phantom-clavicle": dict(kind="seg", structures=("left_clavicle", "right_clavicle"), dataset="phantom",
                             root="data/phantom", preset="cpu"),
    "phantom-lungs":    dict(kind="seg", structures=("left_lung", "right_lung"), dataset="phantom",
                             root="data/phantom", preset="cpu"),
    "scr-heart":        dict(kind="seg", structures=("heart",), dataset="jsrt", root="data/jsrt", preset="gpu"),
    "scr-clavicle":     dict(kind="seg", structures=("left_clavicle", "right_clavicle"), dataset="jsrt",
                             root="data/jsrt", preset="gpu"),
    "scr-lungs":        dict(kind="seg", structures=("left_lung", "right_lung"), dataset="jsrt", root="data/jsrt",
                             preset="gpu"),
}
GENERIC_TASKS = ("multilabel: BCE over the cache's label_names (e.g. a data_prep.py csv cache); multiclass: "
                 "cross-entropy, one label per image; seg:S1[,S2...]: U-Net on the union of those masks of "
                 "meta.json's structures (e.g. seg:left_lung,right_lung)")


def resolve_task(name):
    """The TASKS entry of a task name. Besides the named tasks, three forms work on any cache given with
    --data-root, with no code change (GENERIC_TASKS); they are added to TASKS on first use."""
    if name in TASKS:
        return TASKS[name]
    structures = tuple(s for s in name[len("seg:"):].split(",") if s) if name.startswith("seg:") else ()
    if name in ("multilabel", "multiclass"):
        spec = dict(kind="cls", loss="bce" if name == "multilabel" else "ce", dataset=None, root=None, preset="gpu")
    elif structures:
        spec = dict(kind="seg", structures=structures, dataset=None, root=None, preset="gpu")
    else:
        raise ValueError(f"unknown --task {name!r}: one of {', '.join(TASKS)}, or on any cache with --data-root: "
                         f"{GENERIC_TASKS}")
    TASKS[name] = spec
    return spec


# gpu = the authors' recipe (docs/METHOD.md §7); cpu = small enough for the phantom on a laptop CPU in minutes.
# The cpu preset also narrows the U-Net decoder 2x (smp's default is 256,128,64,32,16): the decoder starts
# random for every init, and at 64 px its full width is a large share of a CPU step.
PRESETS = {
    "gpu": dict(arch="resnet50", img_size=224, epochs=200, batch_size=32, decoder_channels="256,128,64,32,16",
                min_iters=0),
    "cpu": dict(arch="resnet18", img_size=64, epochs=30, batch_size=8, decoder_channels="128,64,32,16,8", min_iters=10),
}
PATIENCE = {"cls": 10, "seg": 20}  # the authors' benchmark code: --patience 10 (classification), 20 (segmentation)
LR = {"cls": 2e-4, "seg": 1e-3}  # docs/METHOD.md §7: Adam lr 2e-4 (classification), 1e-3 (segmentation)


def open_task_cache(task, root):
    spec = resolve_task(task)
    if not (root or spec["root"]):
        raise ValueError(f"--task {task} works on any cache: pass it with --data-root")
    root = Path(root or spec["root"])
    cache = data_prep.open_dataset(spec["dataset"], root)  # as adam.py opens it; a missing phantom is generated
    if spec["kind"] == "seg":
        have = list(cache.meta.get("structures", []))
        if cache.masks is None or not set(spec["structures"]) <= set(have):
            raise ValueError(f"--task {task} needs masks {spec['structures']} but {root}/masks.npy "
                             f"{'is missing' if cache.masks is None else f'holds only {have}'}")
    elif not cache.meta.get("label_names"):
        raise ValueError(f"--task {task} needs labels but {root}/meta.json has no label_names")
    return cache


def draw_shots(train_rows, shots, seed):
    """Few-shot draw: `shots` distinct training rows, a pure function of (seed, shots)."""
    train_rows = sorted(train_rows)
    if shots > len(train_rows):
        raise ValueError(f"--shots {shots} > {len(train_rows)} training images")
    rng = np.random.default_rng([seed, shots])
    return sorted(int(i) for i in rng.choice(train_rows, size=shots, replace=False))


class CacheDataset(torch.utils.data.Dataset):
    """Rows of a data_prep cache as (3 x S x S normalised image, target); mode in train / val / test."""

    def __init__(self, cache, rows, task, img_size, mode):
        self.cache, self.rows, self.spec, self.mode = cache, list(rows), TASKS[task], mode
        self.labels = list(cache.meta.get("label_names", []))
        self.label_of = {r["i"]: r["labels"] for r in cache.index}  # i = row of images.npy
        structures = list(cache.meta.get("structures", []))
        self.channels = [structures.index(s) for s in self.spec.get("structures", ())]
        S, R = img_size, int(round(img_size * 256 / 224))  # classification test: resize 256, crop 224
        if self.spec["kind"] == "seg":  # the authors' benchmark code: SegAugment in training, no augmentation else
            self.tf = v2.Resize((S, S))
            self.augment = SegAugment(S) if mode == "train" else None
        elif mode == "train":  # docs/METHOD.md §7: random resized crop, horizontal flip, rotation +-7
            self.tf = v2.Compose([v2.RandomResizedCrop(S), v2.RandomHorizontalFlip(), v2.RandomRotation(7)])
        elif mode == "val":  # one centre crop keeps validation cheap; the ten crops are for the test
            self.tf = v2.Compose([v2.Resize(R), v2.CenterCrop(S)])
        else:
            self.tf = v2.Compose([v2.Resize(R), v2.TenCrop(S)])

    def __len__(self):
        return len(self.rows)

    def target(self, i):
        names = self.label_of[i]
        if self.spec.get("loss") == "ce":
            if len(names) != 1 or names[0] not in self.labels:
                raise ValueError(f"{self.cache.root}/index.csv row {i}: expected one grade of {self.labels}, "
                                 f"got {names}")
            return torch.tensor(self.labels.index(names[0]))
        y = torch.zeros(len(self.labels))
        for n in names:
            y[self.labels.index(n)] = 1.0
        return y

    def __getitem__(self, j):
        i = self.rows[j]
        x = torch.from_numpy(np.array(self.cache.images[i]))
        x = x.permute(2, 0, 1) if x.ndim == 3 else x[None]  # C x H x W; imagenet_normalise makes grey 3 channels
        x = tv_tensors.Image(x.float() / 255)
        if self.spec["kind"] == "seg":
            m = torch.from_numpy(np.array(self.cache.masks[i, self.channels])).amax(0, keepdim=True)  # 1 x H x W
            x, m = self.tf(x, tv_tensors.Mask(m))
            if self.augment:
                x, m = self.augment(x, m)
            return imagenet_normalise(x), m.float()
        x = self.tf(x)
        x = imagenet_normalise(torch.stack(x) if self.mode == "test" else x)  # test: 10 x 3 x S x S
        return x, self.target(i)


class SegAugment:
    """The segmentation training augmentation of the authors' transfer-learning benchmark (BenchmarkTransferLearning,
    build_transform_segmentation; README "Segmentation protocol") at side S, their sizes in pixels scaled by S/224:
    with p 0.3 one of brightness/contrast (x a + b, a in 1 +- 0.2, b in +-0.2) or gamma (x^g, g in [0.8, 1.2]);
    with p 0.1 an elastic deformation (their alpha 120 px and sigma 6 px; torchvision's alpha is in half-image
    units, so 240 at 224 px); with p 0.25 a square crop of side 156-224 px resized back to S. No flip, no rotation.
    Left out: their grid and optical distortions (p 0.1 each, not in torchvision) and the elastic's small affine."""

    p_intensity, p_elastic, p_crop = 0.3, 0.1, 0.25

    def __init__(self, S):
        s = S / 224                       # displacement ~ alpha / sigma (blurred noise): alpha s^2 with sigma s
        self.S, self.min_side, self.elastic = S, round(156 * s), v2.ElasticTransform(alpha=240 * s * s, sigma=6 * s)

    def __call__(self, x, m):  # x: C x S x S image in [0, 1], m: 1 x S x S mask (tv_tensors)
        u = lambda lo, hi: lo + (hi - lo) * float(torch.rand(()))
        if float(torch.rand(())) < self.p_intensity:  # one of the two, as their OneOf
            y = x * u(0.8, 1.2) + u(-0.2, 0.2) if float(torch.rand(())) < 0.5 else x.pow(u(0.8, 1.2))
            x = tv_tensors.Image(y.clamp(0, 1))
        if float(torch.rand(())) < self.p_elastic:
            x, m = self.elastic(x, m)
        if float(torch.rand(())) < self.p_crop:
            c = int(torch.randint(self.min_side, self.S + 1, ()))
            top, left = int(torch.randint(self.S - c + 1, ())), int(torch.randint(self.S - c + 1, ()))
            x, m = (v2.functional.resized_crop(t, top, left, c, c, [self.S, self.S]) for t in (x, m))
        return x, m


# -----------------------------------------------------------------------------
# Models, losses, metrics

class Classifier(nn.Module):
    def __init__(self, backbone, num_outputs):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.inplanes, num_outputs)  # inplanes = 512 * expansion after the last layer

    def forward(self, x):
        return self.fc(self.backbone(x))


def build_model(task, init, arch, num_outputs, decoder_channels=(256, 128, 64, 32, 16)):
    backbone = load_backbone(init, arch)
    if TASKS[task]["kind"] == "cls":
        return Classifier(backbone, num_outputs)
    return unet(backbone, arch, 1, decoder_channels)


def unet(backbone, arch, classes=1, decoder_channels=(256, 128, 64, 32, 16)):
    """smp's U-Net whose encoder holds `backbone`'s weights (a torchvision ResNet of --arch): the segmentation model,
    and semgen.py's restoration network."""
    import segmentation_models_pytorch as smp  # the U-Net the authors used; its ResNet encoders are torchvision's
    if arch.startswith("wide_resnet"):  # smp lists no wide ResNets: its ResNet encoder with torchvision's widths
        resnet = smp.encoders.encoders[arch.split("_")[1]]                    # resnet50 or resnet101
        smp.encoders.encoders.setdefault(arch, {**resnet, "pretrained_settings": {},
                                                "params": {**resnet["params"], "width_per_group": 128}})
    model = smp.Unet(encoder_name=arch, encoder_weights=None, in_channels=3, classes=classes,
                     decoder_channels=tuple(decoder_channels))
    model.encoder.load_state_dict(backbone.state_dict())  # strict: same keys (no fc / avgpool)
    return model


def encoder_of(model):
    """The pretrained part: Classifier.backbone or the U-Net's encoder."""
    return model.backbone if isinstance(model, Classifier) else model.encoder


def dice_loss(logits, target, eps=1.0):
    """Soft Dice over the whole batch's pixels, as the authors' benchmark (one ratio per batch, not per image).
    logits, target: B x 1 x H x W. eps = their smoothing 1, which keeps empty masks finite."""
    p, t = torch.sigmoid(logits).flatten(), target.flatten()
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def dice_score(pred, target, pooled=False):
    """Hard Dice per image (N,), or pooled over all pixels of all images (the authors' reported "Dice");
    pred, target: N x ... bool. Both empty counts as 1."""
    pred, target = pred.flatten(0 if pooled else 1).float(), target.flatten(0 if pooled else 1).float()
    inter, total = (pred * target).sum(-1), pred.sum(-1) + target.sum(-1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


def auc_undefined(y_true):
    """{class: why} of the columns of an N x C 0/1 target matrix whose ROC AUC is undefined: all one value."""
    y = np.asarray(y_true)
    pos = y.sum(0)
    return {c: "no positive image in the test split" if pos[c] == 0 else "no negative image in the test split"
            for c in range(y.shape[1]) if pos[c] in (0, len(y))}


def roc_auc(y_true, y_score):
    """Per-class ROC AUC, None where it is undefined (the test set holds one value of the class), the mean over the
    defined classes (None if none is), and {class: why} of the undefined ones: never a NaN averaged away."""
    from sklearn.metrics import roc_auc_score
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    undefined = auc_undefined(y_true)
    per = [None if c in undefined else float(roc_auc_score(y_true[:, c], y_score[:, c]))
           for c in range(y_true.shape[1])]
    ok = [a for a in per if a is not None]
    return per, (float(np.mean(ok)) if ok else None), undefined


# -----------------------------------------------------------------------------
# Statistics over runs

def summarize(values):
    """mean, std (ddof 1) and the 95% t-interval of the mean."""
    from scipy import stats
    v = np.asarray(values, dtype=float)
    n, mean = len(v), float(v.mean())
    if n < 2:
        return dict(n=n, mean=mean, std=math.nan, ci_lo=math.nan, ci_hi=math.nan)
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return dict(n=n, mean=mean, std=std, ci_lo=mean - half, ci_hi=mean + half)


def paired_test(a, b):
    """Two-sided paired t-test (scipy.stats.ttest_rel) of a vs b run on the same draws and seeds."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    p = float(stats.ttest_rel(a, b).pvalue) if len(a) >= 2 and np.any(a != b) else math.nan
    return dict(n=len(a), mean_diff=float((a - b).mean()), p=p)


# -----------------------------------------------------------------------------
# One run: train with early stopping on validation loss, test the best epoch

def _loss_fn(task):
    spec = TASKS[task]
    if spec["kind"] == "seg":
        return dice_loss
    return F.cross_entropy if spec["loss"] == "ce" else F.binary_cross_entropy_with_logits


@torch.no_grad()
def _val_loss(model, loader, loss_fn, device):
    model.eval()
    total, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        total += float(loss_fn(model(x), y)) * len(x)
        n += len(x)
    return total / max(n, 1)


@torch.no_grad()
def _test(model, loader, task, device, label_names):
    model.eval()
    spec = TASKS[task]
    if spec["kind"] == "seg":  # Dice pooled over the test set's pixels, as the authors report; the mean per image too
        pred, target = zip(*[((model(x.to(device)) > 0).cpu(), y > 0.5) for x, y in loader])
        pred, target = torch.cat(pred), torch.cat(target)
        return dict(metric="dice", value=100 * float(dice_score(pred, target, pooled=True)),
                    dice_mean_per_image=100 * float(dice_score(pred, target).mean()))
    probs, targets = [], []
    for x, y in loader:  # x: B x 10 x 3 x S x S, the ten crops averaged (docs/METHOD.md §7)
        B = x.shape[0]
        logits = model(x.flatten(0, 1).to(device)).view(B, 10, -1)
        p = logits.softmax(-1) if spec["loss"] == "ce" else logits.sigmoid()
        probs.append(p.mean(1).cpu())
        targets.append(y)
    probs, targets = torch.cat(probs).numpy(), torch.cat(targets)
    if spec["loss"] == "ce":  # one-vs-rest AUC per grade
        targets = F.one_hot(targets, len(label_names))
    per, mean, undefined = roc_auc(targets.numpy(), probs)
    if mean is None:  # checked before training (check_test_labels); a test split cannot change since
        raise ValueError(f"{task}: the ROC AUC is undefined for every label of the test split")
    return dict(metric="auc", value=100 * mean, per_class={n: a for n, a in zip(label_names, per)},
                auc_undefined={label_names[c]: why for c, why in undefined.items()})


def check_test_labels(cache, task):
    """Before any training: the labels whose test AUC will be undefined ({name: why}, said at start and recorded);
    every label undefined is refused, naming the cache: there would be no score to record."""
    spec = TASKS[task]
    if spec["kind"] != "cls":
        return {}
    ds = CacheDataset(cache, cache.rows("test"), task, 32, "val")
    y = torch.stack([ds.target(i) for i in ds.rows])
    y = F.one_hot(y, len(ds.labels)) if spec["loss"] == "ce" else y
    why = {ds.labels[c]: w for c, w in auc_undefined(y.numpy()).items()}
    listed = "; ".join(f"{n}: {w}" for n, w in why.items())
    if len(why) == len(ds.labels):
        raise ValueError(f"--task {task}: the ROC AUC is undefined for every label on the test split of {cache.root} "
                         f"({listed}): the test split needs positive and negative images of a label")
    if why:
        print(f"note: the test AUC of {len(why)} of {len(ds.labels)} labels is undefined ({listed}); the mean AUC is "
              f"over the other {len(ds.labels) - len(why)}, and each record lists them under auc_undefined",
              flush=True)
    return why


def diverged(what, epoch, step, lr, args, where):
    """The error that stops a fine-tune gone non-finite, before its test: no score is recorded for it."""
    return runs.NonFinite(f"{where}{what} is not finite in epoch {epoch}, {step}: training diverged (usual causes: "
                          f"--lr {lr:g} too high, broken images); no score is recorded for this run, the finished "
                          f"runs in {Path(args.out) / 'results.json'} are kept")


def run_one(args, cache, task, label, spec, shots, seed, log_prefix=""):
    t0 = time.time()
    device = torch.device(args.device)
    torch.manual_seed(seed)  # same seed for every init: same head init, same batches, same augmentation
    train_rows = cache.rows("train")
    for split in ("train", "val", "test"):
        if not cache.rows(split):
            raise ValueError(f"{cache.root}/index.csv has no {split!r} rows; {task} needs train, val and test")
    if shots:
        train_rows = draw_shots(train_rows, shots, seed)
    labels = list(cache.meta.get("label_names", []))
    model = build_model(task, spec, args.arch, len(labels), args.decoder_channels).to(device)
    if args.freeze:  # linear probe / frozen encoder: BatchNorm statistics stay the pretrained ones
        for p in encoder_of(model).parameters():
            p.requires_grad_(False)
    ds = lambda rows, mode: CacheDataset(cache, rows, task, args.img_size, mode)
    # An epoch is at least --min-iters batches (cpu preset), so that 3 shots give the optimiser a few steps; 0 = one
    # pass over the draw, as the authors (gpu preset: a 3-shot epoch is one batch of 3).
    train_ds = ds(train_rows, "train")
    n_samples = max(len(train_ds), args.batch_size * args.min_iters)
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(train_ds, num_samples=n_samples, generator=g)
    mk = lambda d, **kw: torch.utils.data.DataLoader(d, batch_size=args.batch_size, num_workers=args.workers,
                                                     pin_memory=device.type == "cuda", **kw)
    train_loader = mk(train_ds, sampler=sampler, drop_last=n_samples >= args.batch_size)
    val_rows = cache.rows("val")[:args.val_images] if args.val_images else cache.rows("val")  # fixed subset
    val_loader = mk(ds(val_rows, "val"))
    loss_fn = _loss_fn(task)
    lr = _config(args)["lr"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, foreach=True)  # foreach: one fused update, faster on CPU too
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5)  # classification, §7
    best, best_state, best_epoch, bad, epoch_times = math.inf, None, 0, 0, []
    for epoch in range(1, args.epochs + 1):
        te = time.time()
        model.train()
        if args.freeze:
            encoder_of(model).eval()
        train_loss, n = 0.0, 0
        for i, (x, y) in enumerate(train_loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            if not math.isfinite(loss.item()):  # diverged: stop before the step, record nothing
                raise diverged("the training loss", epoch, f"step {i + 1} of {len(train_loader)}", lr, args, log_prefix)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_loss, n = train_loss + loss.item() * len(x), n + len(x)
        val = _val_loss(model, val_loader, loss_fn, device)
        bad_weight = first_nonfinite(model.state_dict())  # the epoch's last step can break a weight
        if bad_weight or not math.isfinite(val):
            raise diverged(bad_weight or "the validation loss", epoch, "its end", lr, args, log_prefix)
        if TASKS[task]["kind"] == "seg":  # the authors' cosine over --epochs, set after each epoch as their loop does
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))
        else:
            sched.step(val)
        if val < best:
            best, best_epoch, bad = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())  # kept in memory, written once at the end
        else:
            bad += 1
        epoch_times.append(time.time() - te)
        eta = np.mean(epoch_times) * (args.epochs - epoch)
        print(f"{log_prefix}epoch {epoch}/{args.epochs} train {train_loss / max(n, 1):.4f} val {val:.4f} "
              f"best {best:.4f}@{best_epoch} lr {opt.param_groups[0]['lr']:.1e} {epoch_times[-1]:.1f}s "
              f"eta<={eta:.0f}s", flush=True)
        if bad > args.patience:  # the authors' rule: stop once more than --patience epochs brought no better loss
            break
    model.load_state_dict(best_state)  # the first epoch's at least: every validation loss was finite
    test_ds = CacheDataset(cache, cache.rows("test"), task, args.img_size, "test")
    res = _test(model, mk(test_ds), task, device, labels)
    record = dict(init=label, init_spec=spec, task=task, shots=shots, run=None, seed=seed, **res,
                  epochs=epoch, best_epoch=best_epoch, best_val_loss=best, time_s=round(time.time() - t0, 2),
                  **_config(args), n_train=len(train_rows), n_test=len(test_ds), device=str(device),
                  train_rows=train_rows if shots else None)  # the few-shot draw, for audits and pairing
    if args.save == "best":
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{label}_{task}_{shots or 'all'}shot_seed{seed}")
        write_atomic(Path(args.out) / "checkpoints" / f"{name}.pth",
                lambda p: torch.save({"model": best_state, "record": {k: v for k, v in record.items()
                                      if not isinstance(v, (dict, list))}}, p))
    return record


# -----------------------------------------------------------------------------
# Reports: results.json, results.md (Table 1 style), results.png

def _config(args):
    """Settings that change a run's result: a rerun with the same ones is skipped (resume)."""
    kind = TASKS[args.task]["kind"]
    return dict(arch=args.arch, img_size=args.img_size, freeze=args.freeze, lr=args.lr or LR[kind],
                batch_size=args.batch_size, max_epochs=args.epochs, patience=args.patience, min_iters=args.min_iters,
                decoder_channels=args.decoder_channels if kind == "seg" else None,
                val_images=args.val_images)


def _key(r):
    return (r["task"], r["init"], r["shots"], r["seed"]) + tuple(json.dumps(r[k]) for k in sorted(CONFIG_KEYS))


CONFIG_KEYS = ("arch", "img_size", "freeze", "lr", "batch_size", "max_epochs", "patience", "min_iters",
               "decoder_channels", "val_images")


def _groups(records):
    """task -> init -> shots -> {seed: value} (preserving first-seen order of inits and shots)."""
    out = {}
    for r in records:
        out.setdefault(r["task"], {}).setdefault(r["init"], {}).setdefault(r["shots"], {})[r["seed"]] = r["value"]
    return out


def write_table(records, path):
    fmt = lambda x, d=2: "–" if x is None or math.isnan(x) else f"{x:.{d}f}"
    lines = []
    for task, inits in _groups(records).items():
        metric = next(r["metric"] for r in records if r["task"] == task)
        shots = sorted({s for by in inits.values() for s in by}, key=lambda s: (s is None, s or 0))
        cols = [f"{s}-shot" if s else "all" for s in shots]
        head = "| Method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols)
        lines += [f"## {task}: {metric} (%), mean ± std over runs", "", head]
        undefined = {n: w for r in records if r["task"] == task for n, w in (r.get("auc_undefined") or {}).items()}
        if undefined:  # said beside the numbers, never averaged away silently
            lines[-1:-1] = [f"AUC undefined, so left out of the mean: {'; '.join(f'{n} ({w})' for n, w in undefined.items())}.", ""]
        stats = {i: {s: summarize(list(by[s].values())) for s in by} for i, by in inits.items()}
        for init, by in stats.items():
            lines.append(f"| {init} | " + " | ".join(
                f"{fmt(by[s]['mean'])} ± {fmt(by[s]['std'])}" if s in by else "" for s in shots) + " |")
        lines += ["", "95% confidence interval of the mean (t distribution), runs n:", "", head]
        for init, by in stats.items():
            lines.append(f"| {init} | " + " | ".join(
                f"[{fmt(by[s]['ci_lo'])}, {fmt(by[s]['ci_hi'])}] n={by[s]['n']}" if s in by else ""
                for s in shots) + " |")
        ref = next(iter(inits))
        if len(inits) > 1:
            lines += ["", f"Paired difference vs {ref} on the same draws and seeds "
                          "(two-sided paired t-test, scipy.stats.ttest_rel): Δ mean (p)", "", head]
            for init, by in inits.items():
                if init == ref:
                    continue
                cells = []
                for s in shots:
                    common = sorted(set(by.get(s, {})) & set(inits[ref].get(s, {})))
                    if not common:
                        cells.append("")
                        continue
                    t = paired_test([by[s][k] for k in common], [inits[ref][s][k] for k in common])
                    cells.append(f"{t['mean_diff']:+.2f} (p={fmt(t['p'], 3)}, n={t['n']})")
                lines.append(f"| {init} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    write_atomic(path, lambda p: Path(p).write_text(text))
    return text


def write_plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = _groups(records)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (task, inits) in zip(axes[0], groups.items()):
        n_all = max((r["n_train"] for r in records if r["task"] == task and not r["shots"]), default=None)
        for init, by in inits.items():
            xs = sorted(by, key=lambda s: s or n_all)
            st = [summarize(list(by[s].values())) for s in xs]
            ax.errorbar([s or n_all for s in xs], [d["mean"] for d in st],
                        yerr=[0 if math.isnan(d["std"]) else d["std"] for d in st], marker="o", capsize=3, label=init)
        metric = next(r["metric"] for r in records if r["task"] == task)
        ticks = sorted({s or n_all for by in inits.values() for s in by})
        ax.set(xscale="log", xlabel="labelled training images (shots)", ylabel=f"{metric} (%)", title=task)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# -----------------------------------------------------------------------------

def get_args(argv=None):
    p = runs.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    n0, n1 = runs.number(int, 0), runs.number(int, 1)  # argparse types: flags checked when parsed
    g = p.add_argument_group("task and data")
    g.add_argument("--task", required=True, help=f"downstream task: {', '.join(TASKS)}; or, on any cache given "
                   f"with --data-root, {GENERIC_TASKS}")
    g.add_argument("--data-root", default=None,
                   help="data_prep cache (default data/<dataset>); phantom tasks generate it when missing")
    g = p.add_argument_group("starting points")
    g.add_argument("--init", action="append", default=None,
                   help="repeatable: adam:PATH, moco:PATH, torchvision:PATH, imagenet[:WEIGHTS] (torchvision's, "
                        "from the torch.hub cache or downloaded), timm:PATH, xrv:PATH (torchxrayvision ResNet) or "
                        "random, optionally NAME=SPEC; the first one is the reference of the paired test "
                        "(default: random)")
    g.add_argument("--arch", default=None, choices=ARCHS, help="backbone (adam.ARCHS); must match the checkpoint "
                   "(default: resnet50 on real data, resnet18 on phantoms)")
    g.add_argument("--freeze", action="store_true",
                   help="train only the head (linear probe) / the U-Net decoder; encoder weights and BN stay")
    g = p.add_argument_group("few-shot and repetitions")
    g.add_argument("--shots", default=None, help="comma list such as 3,6,12,24: labelled training images drawn "
                   "from the train split (default: the whole train split)")
    g.add_argument("--runs", type=n1, default=1, help="repetitions with seeds seed, seed+1, ...: the draw and "
                   "the training differ per run, and are the same for every --init (paired)")
    g.add_argument("--seed", type=runs.seed, default=0, help="first seed; recorded in every result")
    g = p.add_argument_group("optimisation (defaults: --preset)")
    g.add_argument("--preset", default="auto", choices=("auto", "cpu", "gpu"),
                   help="gpu = authors' recipe (resnet50, 224 px, batch 32, 200 epochs with early stopping, an epoch = "
                        "one pass); cpu = resnet18, 64 px, batch 8, 30 epochs of >= 10 batches; auto = cpu for phantom "
                        "tasks")
    g.add_argument("--img-size", type=runs.number(int, 16), default=None,
                   help="side in pixels (U-Net needs a multiple of 32)")
    g.add_argument("--epochs", type=n1, default=None, help="max epochs; early stopping usually ends sooner")
    g.add_argument("--batch-size", type=runs.number(int, 2, why="BatchNorm trains on a batch's statistics"),
                   default=None)
    g.add_argument("--lr", type=runs.number(float, 0, 1e30, low_open=True), default=None,
                   help="Adam lr (default 2e-4 classification, 1e-3 segmentation)")
    g.add_argument("--patience", type=n0, default=None, help="stop when more than this many epochs in a row bring no "
                   "better validation loss (the authors' rule; default 10 classification, where ReduceLROnPlateau "
                   "halves lr after 5, and 20 segmentation, cosine lr)")
    g.add_argument("--decoder-channels", default=None,
                   help="U-Net decoder widths, 5 comma-separated ints (gpu preset: smp's 256,128,64,32,16)")
    g.add_argument("--val-images", type=n1, default=None, help="early-stop on the first N validation images "
                   "only (saves CPU time; default: all)")
    g.add_argument("--min-iters", type=n0, default=None, help="at least this many batches per epoch (few-shot sets "
                   "are cycled), so a 3-shot epoch is not one step; 0 = one pass over the training images, as the "
                   "authors (gpu preset: 0, cpu preset: 10)")
    g = p.add_argument_group("system and output")
    g.add_argument("--device", type=runs.device, default="auto", help="auto (cuda where torch sees a GPU, else "
                   "cpu), cpu, cuda or cuda:N")
    g.add_argument("--workers", type=n0, default=None, help="data loader workers (default 4 on GPU, 0 on CPU)")
    g.add_argument("--out", type=runs.out_folder, default="runs/finetune",
                   help="results.json / results.md / results.png go here; a rerun adds the runs it lacks")
    g.add_argument("--save", default="best", choices=("best", "none"),
                   help="best: write each run's best-epoch weights to OUT/checkpoints/")
    args = p.parse_args(argv)
    args.device = runs.resolve_device(args.device)
    try:
        resolve_task(args.task)
    except ValueError as e:
        p.error(str(e))
    if TASKS[args.task]["root"] is None and not args.data_root:
        p.error(f"--task {args.task} works on any cache: pass it with --data-root (a data_prep.py output folder)")
    preset = PRESETS[TASKS[args.task]["preset"] if args.preset == "auto" else args.preset]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.decoder_channels = [int(c) for c in args.decoder_channels.split(",")]
        assert len(args.decoder_channels) == 5
    except (ValueError, AssertionError):
        p.error(f"--decoder-channels {args.decoder_channels!r}: expected 5 comma-separated integers")
    if args.workers is None:
        args.workers = 4 if args.device.startswith("cuda") else 0
    if args.patience is None:
        args.patience = PATIENCE[TASKS[args.task]["kind"]]
    args.init = args.init or ["random"]
    try:
        args.shots = [int(s) for s in args.shots.split(",")] if args.shots else [None]
    except ValueError:
        p.error(f"--shots {args.shots!r}: expected a comma list of integers such as 3,6,12,24")
    if any(s is not None and s < 1 for s in args.shots):
        p.error("--shots must be positive")
    if TASKS[args.task]["kind"] == "seg" and args.img_size % 32:
        p.error(f"--img-size {args.img_size}: the U-Net needs a multiple of 32")
    return args


def _parse_init(s):
    name, eq, spec = s.partition("=")
    if eq and ":" not in name and "/" not in name:
        return name, spec
    return s, s


RECORD_KEYS = ("task", "init", "shots", "seed", "metric", "value")


def read_results(path):
    """OUT/results.json as a list of records ([] when missing); a file of another shape is refused, not replaced."""
    return runs.read_json(path, "--out", f"a finetune.py results file (a list of records with {', '.join(RECORD_KEYS)})",
                          lambda r: isinstance(r, list) and all(isinstance(x, dict) and set(RECORD_KEYS) <= set(x)
                                                                for x in r)) or []


def check_rerun(records, args, data, inits, path):
    """OUT holds one dataset and one set of settings per task, one starting point per --init name: a rerun that
    differs is refused naming the flag (the table would mix them silently); one that agrees adds its runs."""
    config, flags = _config(args), {"max_epochs": "--epochs"}
    for r in records:
        if r["task"] != args.task:
            continue
        runs.check_data("--data-root", args.data_root or TASKS[args.task]["root"], r.get("data"), data,
                        f"the {args.task} runs in {path}")
        for key in CONFIG_KEYS:
            if key in r and r[key] != config[key]:
                flag = flags.get(key, "--" + key.replace("_", "-"))
                raise ValueError(f"{flag} {config[key]}: {path} holds {args.task} runs with {flag} {r[key]}, and one "
                                 f"table mixes no settings: pass {flag} {r[key]} to add runs to it, or pick another "
                                 f"--out")
        spec = dict(inits).get(r["init"])
        if spec is not None and r.get("init_spec", spec) != spec:
            raise ValueError(f"--init {r['init']}={spec}: {path} holds {args.task} runs of {r['init']} from "
                             f"{r['init_spec']}; give this starting point another NAME= or pick another --out")


def main(argv=None):
    args = get_args(argv)
    with runs.locked(args.out, "finetune.py"):
        return _main(args, Path(args.out))


def _main(args, out):
    cache = open_task_cache(args.task, args.data_root)
    data = runs.data_identity(cache.root)
    results_path = out / "results.json"
    records = read_results(results_path)
    inits = [_parse_init(s) for s in args.init]
    check_rerun(records, args, data, inits, results_path)
    undefined = check_test_labels(cache, args.task)
    done = {_key(r) for r in records if all(k in r for k in CONFIG_KEYS)}
    config = _config(args)
    key_of = lambda label, shots, seed: _key(dict(task=args.task, init=label, shots=shots, seed=seed, **config))
    jobs = [(shots, run, label, spec) for shots in args.shots for run in range(args.runs) for label, spec in inits]
    t_start, n_done = time.time(), 0
    for j, (shots, run, label, spec) in enumerate(jobs):
        seed = args.seed + run
        key = key_of(label, shots, seed)
        if key in done:
            print(f"skip (already in {results_path}): {label} {shots or 'all'}-shot seed {seed}", flush=True)
            continue
        prefix = f"[{j + 1}/{len(jobs)} {label} {args.task} {shots or 'all'}-shot seed {seed}] "
        r = run_one(args, cache, args.task, label, spec, shots, seed, log_prefix=prefix)
        r["run"], r["data"] = run, data
        records.append(r)
        done.add(key)
        runs.write_json(results_path, records)
        n_done += 1
        left = sum(1 for sh, ru, la, _ in jobs[j + 1:] if key_of(la, sh, args.seed + ru) not in done)
        eta = (time.time() - t_start) / n_done * left
        over = f" (mean over {len(cache.meta['label_names']) - len(undefined)} labels)" if undefined else ""
        print(f"{prefix}{r['metric']} {r['value']:.2f}%{over} after {r['epochs']} epochs (best {r['best_epoch']}) "
              f"in {r['time_s']:.0f}s; {left} runs left, eta {eta:.0f}s", flush=True)
    mine = [r for r in records if r["task"] == args.task]
    table = write_table(records, out / "results.md") if records else ""
    if records:
        write_plot(records, out / "results.png")
    print(table)
    return dict(out=str(out), records=mine, table=table)


if __name__ == "__main__":  # bad input, a full disk, a busy --out, Ctrl-C or SIGTERM: one line, no traceback
    runs.command_line("finetune.py", main, (OSError, ValueError, data_prep.DataError),
                      note=lambda: f"the finished runs are in {Path(get_args().out) / 'results.json'}; the same "
                                   f"command goes on with the rest")
