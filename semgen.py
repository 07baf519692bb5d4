"""
Semantic Genesis 2D: self-discovery, self-classification and self-restoration of anatomical patterns, in one file.

    Haghighi, Hosseinzadeh Taher, Zhou, Gotway, Liang. "Learning Semantics-enriched Representation via
    Self-discovery, Self-classification, and Self-restoration". MICCAI 2020 (arXiv 2007.06959).

The authors' forerunner of TransVW, built for 3D CT and also trained in 2D on ChestX-ray14: the natural restorative
baseline for Adam. This is the 2D method; baselines.py's loop trains it on adam.py's data, backbone, presets, step
budget and seeds, and writes the run folder finetune.py and eve.py read (`--init adam:RUN`). Spec: docs/METHOD.md §11.

    python baselines.py semgen --out runs/semgen                                      # CPU demo preset on the phantoms
    python baselines.py semgen --discovery adam:runs/adam --out runs/semgen_on_adam   # patterns found in Adam's embedding
    python baselines.py semgen --data chestxray14 --out runs/semgen                   # the paper preset

Sections, in the order of the paper (Fig. 1):
  1. configuration     add_flags(): discovery, pattern and loss flags (the shared ones: baselines.parser)
  2. self-discovery    discover(): embed every image; per class a reference image, its K nearest neighbours and one
                       random coordinate -> the class's patterns
  3. self-restoration  Models Genesis' transformations: non-linear intensity (Bezier curve), local pixel shuffling,
                       in-painting, out-painting; one of the four per sample
  4. patterns          PatternCrops: (neighbour, class) -> transformed crop, crop, class
  5. model and loss    the ResNet as the encoder of a U-Net that restores, a classification head on its last map;
                       lambda_cls CE + lambda_rec MSE
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import adam
from adam_cxr import runs

# -----------------------------------------------------------------------------
# 1. Configuration. Defaults: the authors' release (config.py, pattern_generator_3D.py) where it has a 2D reading,
# else ours, marked in docs/METHOD.md §11.


def add_flags(p):
    g = p.add_argument_group("Semantic Genesis (docs/METHOD.md §11)")
    g.add_argument("--discovery", default="random", help="the embedding self-discovery searches: any finetune.py "
                   "--init form, e.g. random (torchvision's init with --seed), imagenet, adam:RUN (Adam's run)")
    g.add_argument("--classes", type=runs.number(int, 2), default=44, help="C pseudo-classes (authors' CT: 44)")
    g.add_argument("--neighbours", type=runs.number(int, 1), default=200,
                   help="K training images per class: the reference and its nearest neighbours (authors: 200)")
    g.add_argument("--val-neighbours", type=runs.number(int, 1), default=30,
                   help="validation images per class, nearest to the class's reference (authors: 30)")
    g.add_argument("--patch", type=runs.number(float, 0.05, 1), default=0.25,
                   help="a pattern's side as a fraction of the image's (ours: a quarter)")
    g.add_argument("--lambda-cls", type=runs.number(float, 0), default=0.01, help="weight of the classification "
                   "loss (authors: 0.01)")
    g.add_argument("--lambda-rec", type=runs.number(float, 0), default=1.0, help="weight of the restoration loss "
                   "(authors: 1)")


# -----------------------------------------------------------------------------
# 2. Self-discovery (docs/METHOD.md §11.1). The authors' release draws a new reference for every class, so each
# class is one coordinate in the K images most similar to its own reference: a pattern recurs across similar
# patients, and different classes come from different corners of the data.

@torch.no_grad()
def embed_images(encoder, images, img_size, device, batch_size=64):
    """Whole images resized to img_size, through eve.BackboneFeatures: N x D pooled features."""
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.stack([F.interpolate(torch.as_tensor(images[i]).float()[None] / 255, size=(img_size, img_size),
                                       mode="bilinear", antialias=True)[0]
                         for i in range(s, min(s + batch_size, len(images)))])
        out.append(encoder(x.to(device)).float().cpu())
    return torch.cat(out)


def nearest(features, anchor, k):
    """Indices of the k rows of features (N x D) nearest to anchor (D) in L2 distance, nearest first."""
    return torch.linalg.vector_norm(features - anchor, dim=1).argsort(stable=True)[:k].tolist()


def discover(args, train_images, val_images, device, say=print):
    """-> patterns: {"discovery", "patch", "coords" (C x (top, left) as fractions of the image), "references" (C),
    "train" (C lists of K image indices), "val" (C lists)}. Seeded by --seed; the embedding's own random init
    (--discovery random) is drawn aside, so the training's backbone is still adam.py's for this seed."""
    import eve
    import finetune
    C, K, n = args.classes, min(args.neighbours, len(train_images)), len(train_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        encoder = eve.BackboneFeatures(finetune.load_backbone(args.discovery, args.arch)).to(device).eval()
    say(f"self-discovery: {C} classes x {K} images in the --discovery {args.discovery} embedding of "
        f"{len(train_images)} images")
    f_train = embed_images(encoder, train_images, args.img_size, device)                     # N x D
    f_val = embed_images(encoder, val_images, args.img_size, device) if val_images is not None else None
    g = torch.Generator().manual_seed(args.seed)
    # references never reused (authors' code) while the split has enough; more classes than images: another round
    references = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-C // n))])[:C].tolist()
    coords = (torch.rand(C, 2, generator=g, dtype=torch.float64) * (1 - args.patch)).tolist()  # box inside the image
    return {"discovery": args.discovery, "patch": args.patch, "coords": coords, "references": references,
            "train": [nearest(f_train, f_train[r], K) for r in references],
            "val": [] if f_val is None else [nearest(f_val, f_train[r], min(args.val_neighbours, len(f_val)))
                                             for r in references]}


def patterns_of(args, train_images, val_images, device, say):
    """The run's patterns: found once, kept in OUT/patterns.json, read back when the run resumes."""
    if args.resume and (Path(args.resume) / "patterns.json").is_file():
        return json.loads((Path(args.resume) / "patterns.json").read_text())
    found = discover(args, train_images, val_images, device, say)
    runs.write_atomic(Path(args.out) / "patterns.json", lambda p: Path(p).write_text(json.dumps(found)))
    return found


# -----------------------------------------------------------------------------
# 3. Self-restoration: Models Genesis' transformations (Zhou et al., MICCAI 2019 / MedIA 2021; docs/METHOD.md
# §11.2) on C x H x W crops in [0, 1], in 2D. Each draws its parameters from a torch.Generator, then applies them
# in a function of its own, so that the tests check each against its definition.

def bezier_curve(points, n=100_000):
    """Models Genesis' Bezier curve through control points P_0 .. P_d: B(t) = sum_i C(d, i) t^(d-i) (1-t)^i P_i at n
    values of t in [0, 1] (from P_d at t = 0 to P_0 at t = 1) -> (xs, ys), float64."""
    points = torch.as_tensor(points, dtype=torch.float64)                  # (d+1) x 2
    d, t = len(points) - 1, torch.linspace(0, 1, n, dtype=torch.float64)
    basis = torch.stack([math.comb(d, i) * t ** (d - i) * (1 - t) ** i for i in range(d + 1)])   # (d+1) x n
    xs, ys = points.t() @ basis
    return xs, ys


def interp(x, xp, fp):
    """numpy.interp: the piecewise-linear function through (xp, fp), xp non-decreasing, constant outside."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1 = xp[i - 1], xp[i]
    w = torch.where(x1 > x0, (x - x0) / (x1 - x0).clamp_min(1e-300), torch.ones_like(x))
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


def intensity_curve(x, p1, p2, flip):
    """Non-linear intensity transformation: every pixel value v -> the cubic Bezier curve from (0, 0) over p1, p2
    to (1, 1), read at v; with flip, the curve's values in reverse, an intensity inversion."""
    xs, ys = bezier_curve([(0.0, 0.0), p1, p2, (1.0, 1.0)])
    xs, ys = (xs.sort().values, ys) if flip else (xs.sort().values, ys.sort().values)
    return interp(x.double(), xs, ys).to(x.dtype)


def shuffle_count(h, w):
    """Blocks of local pixel shuffling: Models Genesis shuffles 10,000 blocks of 1..6 x 1..6 x 1..3 voxels in its
    64 x 64 x 32 cubes, covering them 1.87 times on average; the same coverage of an h x w crop with its blocks of
    1..h/10 x 1..w/10 pixels."""
    coverage = 10_000 * 3.5 * 3.5 * 2 / (64 * 64 * 32)
    mean_h, mean_w = (1 + max(1, h // 10)) / 2, (1 + max(1, w // 10)) / 2
    return math.ceil(coverage * h * w / (mean_h * mean_w))


def randint(low, high, g):
    """An integer in [low, high], both ends included (Python's random.randint, which the authors' code uses)."""
    return int(torch.randint(low, high + 1, (), generator=g))


def shuffle_blocks(h, w, g):
    """(top, left, height, width) of each block: sides uniform in 1..side/10, anywhere inside the crop."""
    blocks = []
    for _ in range(shuffle_count(h, w)):
        bh, bw = randint(1, max(1, h // 10), g), randint(1, max(1, w // 10), g)
        blocks.append((randint(0, h - bh, g), randint(0, w - bw, g), bh, bw))
    return blocks


def local_pixel_shuffling(x, blocks, g):
    """Each block's pixels, read from the original crop, written back in a random order (all channels alike)."""
    out = x.clone()
    for top, left, bh, bw in blocks:
        window = x[:, top:top + bh, left:left + bw].reshape(x.shape[0], -1)
        out[:, top:top + bh, left:left + bw] = window[:, torch.randperm(bh * bw, generator=g)].view(-1, bh, bw)
    return out


def inpaint_boxes(h, w, g):
    """In-painting: up to 5 boxes, each drawn with probability 0.95 while drawing continues; sides in
    [side/6, side/3], at least 3 pixels from the border."""
    boxes = []
    while len(boxes) < 5 and torch.rand((), generator=g) < 0.95:
        bh, bw = randint(h // 6, h // 3, g), randint(w // 6, w // 3, g)
        boxes.append((randint(3, h - bh - 3, g), randint(3, w - bw - 3, g), bh, bw))
    return boxes


def outpaint_boxes(h, w, g):
    """Out-painting: one window kept, then up to 4 more, each with probability 0.95 while drawing continues; sides
    side - [3 side/7, 4 side/7], at least 3 pixels from the border."""
    boxes = []
    while not boxes or len(boxes) < 5 and torch.rand((), generator=g) < 0.95:
        bh, bw = h - randint(3 * h // 7, 4 * h // 7, g), w - randint(3 * w // 7, 4 * w // 7, g)
        boxes.append((randint(3, h - bh - 3, g), randint(3, w - bw - 3, g), bh, bw))
    return boxes


def paint(x, boxes, noise, inside):
    """inside: the boxes get `noise` (in-painting); else everything but the boxes does (out-painting)."""
    mask = torch.zeros(x.shape[1:], dtype=torch.bool)
    for top, left, bh, bw in boxes:
        mask[top:top + bh, left:left + bw] = True
    return torch.where(mask if inside else ~mask, noise, x)


TRANSFORMS = ("local-shuffle", "non-linear", "in-paint", "out-paint")


def genesis_transform(x, g):
    """One of the four, each with probability 1/4 (the authors' Semantic Genesis loader): C x H x W in [0, 1] ->
    (transformed crop, its index in TRANSFORMS)."""
    h, w = x.shape[1:]
    which = int(torch.randint(4, (), generator=g))
    if which == 0:
        return local_pixel_shuffling(x, shuffle_blocks(h, w, g), g), which
    if which == 1:
        p1, p2 = torch.rand(2, 2, generator=g, dtype=torch.float64).tolist()
        return intensity_curve(x, p1, p2, flip=bool(torch.rand((), generator=g) < 0.5)), which
    boxes = inpaint_boxes(h, w, g) if which == 2 else outpaint_boxes(h, w, g)
    return paint(x, boxes, torch.rand(x.shape, generator=g), inside=which == 2), which


# -----------------------------------------------------------------------------
# 4. Patterns. Each (image, class) pair is one instance of the class's pattern: the crop at the class's coordinate.
# The authors' release keeps three crops per instance: that one, and two of a random side in [50, 80] / 64 of the
# pattern's and shifted by up to 10 / 64 of it; here each draw is one of the three.

class PatternCrops(torch.utils.data.Dataset):
    def __init__(self, images, neighbours, coords, patch, img_size):
        self.images, self.coords, self.patch, self.img_size = images, coords, patch, img_size
        self.pairs = [(i, c) for c, members in enumerate(neighbours) for i in members]

    def __len__(self):
        return len(self.pairs)

    def box(self, c, H, W, g):
        """(top, left, height, width) of class c's crop in an H x W image: the pattern's, or a resized and shifted
        one, kept inside the image."""
        h, w = self.patch * H, self.patch * W
        top, left = self.coords[c][0] * H, self.coords[c][1] * W
        if torch.rand((), generator=g) >= 1 / 3:
            s = 50 / 64 + 30 / 64 * torch.rand((), generator=g).item()
            dy, dx = ((torch.rand(2, generator=g) * 2 - 1) * 10 / 64).tolist()
            top, left, h, w = top + (h - s * h) / 2 + dy * h, left + (w - s * w) / 2 + dx * w, s * h, s * w
        h, w = min(H, max(1, round(h))), min(W, max(1, round(w)))
        return min(max(0, round(top)), H - h), min(max(0, round(left)), W - w), h, w

    def __getitem__(self, item):
        j, seed = item
        i, c = self.pairs[j]
        g = torch.Generator().manual_seed(seed)
        x = torch.as_tensor(self.images[i])                                    # C x H x W uint8
        top, left, h, w = self.box(c, *x.shape[1:], g)
        y = F.interpolate(x[None, :, top:top + h, left:left + w].float() / 255, size=(self.img_size,) * 2,
                          mode="bilinear", antialias=True)[0].clamp(0, 1)      # C x S x S: what is restored
        x_t, _ = genesis_transform(y, g)
        return adam.imagenet_normalise(x_t), y, c                              # 3 x S x S, C x S x S, class


# -----------------------------------------------------------------------------
# 5. Model and loss (docs/METHOD.md §11.3). The authors' Y-Net: an encoder, a decoder that restores the crop
# (sigmoid output, MSE) and a classification head on the encoder's deepest map (conv 3x3 to 1024 channels, BN,
# ReLU, global average pool, linear, softmax cross-entropy). Here the encoder is the ResNet, the decoder smp's U-Net
# decoder (finetune.unet: the U-Net the segmentation fine-tuning uses).

class ClassificationHead(nn.Sequential):
    def __init__(self, width, classes):
        super().__init__(nn.Conv2d(width, 1024, 3, padding=1), nn.BatchNorm2d(1024), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, classes))


def semgen_loss(logits, labels, restored, target, lambda_cls, lambda_rec):
    """lambda_cls CE(logits, labels) + lambda_rec MSE(restored, target) -> (loss, {"cls_loss", "rec_loss",
    "cls_acc"}): the weighted terms, as the authors' log shows them."""
    cls = lambda_cls * F.cross_entropy(logits, labels)
    rec = lambda_rec * F.mse_loss(restored, target)
    acc = (logits.argmax(1) == labels).float().mean().item()
    return cls + rec, {"cls_loss": cls.item(), "rec_loss": rec.item(), "cls_acc": acc}


class SemanticGenesis(nn.Module):
    def __init__(self, args, train_images, val_images, device, say=print):
        super().__init__()
        import finetune
        encoder = adam.Encoder(args.arch, 128, 1)                     # first: the backbone adam.py starts from
        channels = train_images[0].shape[0]                           # restore what the images hold: grey or RGB
        self.unet = finetune.unet(encoder.backbone, args.arch, classes=channels)
        self.unet.classification_head = ClassificationHead(encoder.head[0].in_features, args.classes)
        self.patterns = patterns_of(args, train_images, val_images, device, say)
        self.args = args

    @property
    def backbone(self):
        """What the run exports: smp's ResNet encoder has torchvision's key names, without fc (runs.export_backbone)."""
        return self.unet.encoder

    def dataset(self, images, split):
        return PatternCrops(images, self.patterns[split], self.patterns["coords"], self.patterns["patch"],
                            self.args.img_size)

    def forward_loss(self, item, device, layout):
        x, y, c = item
        restored, logits = self.unet(x.to(device, non_blocking=True, memory_format=layout))   # smp: masks, labels
        with torch.autocast(device.type, enabled=False):  # the loss in float32, as adam.py's
            return semgen_loss(logits.float(), c.to(device), torch.sigmoid(restored.float()), y.to(device),
                               self.args.lambda_cls, self.args.lambda_rec)

    def after_step(self):
        pass

