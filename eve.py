"""
Eve: what does a pretrained encoder understand of anatomy? (docs/METHOD.md §8; paper Sect. 3.3, 3.4, Ablation 1)

The paper shows its embedding properties as pictures only; this script turns each into numbers too:

  locality          a patch around each labelled landmark -> global-average-pooled backbone features ->
                    k-NN landmark accuracy, cross-validated with folds grouped by image (a landmark must be
                    recognised in images the classifier never saw), silhouette score; figure: t-SNE.
  compositionality  a random patch and its split into 2, 3 or 4 non-overlapping parts, all resized to the
                    input size; cosine(f(whole), sum_i f(part_i)); mean/std/quartiles, and the same cosine
                    with another patch's parts as a baseline (gap = mean - baseline); figure: KDE.
  correspondence    grid features of image A and of image B; each A cell is matched to the B cell of highest
                    cosine. B is A under a known affine (self) or another phantom (pair; truth = the affine
                    fitted to the 10 landmark pairs); share of cells matched within one cell of the truth and
                    landmark error in pixels; figure: matches with cosine >= 0.8, and the real radiograph
                    RG1_UNCR.dcm from pydicom-data as a demo of the self case.

  frozen            adam_cxr/probes.py on the frozen backbone (docs/learning.md): one-shot landmark localisation
                    error, linear probes of the heart and clavicle masks from 3 and 12 images (Dice, AP), a linear
                    probe of the image labels (AUC); printed beside a random init and a no-look baseline.

Example (phantom, CPU, under a minute per init; NAME= names a column):
  python eve.py --arch resnet18 --img-size 64 --data phantom --out runs/eve \\
      --compare adam=adam:runs/adam moco=adam:runs/moco random

Encoders are any callable mapping grey images in [0, 1] (B x C x S x S) to features (B x D); the measurement
functions take such a callable, so they can be tested with hand-made encoders of known behaviour.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data_prep
from adam import ARCHS, feature_map, imagenet_normalise
from adam_cxr import probes  # the frozen-feature measures (landmarks, mask and label probes)
from adam_cxr import runs
from adam_cxr.runs import write_atomic
from finetune import load_backbone  # every checkpoint form finetune.py accepts

WHAT = ("locality", "compositionality", "correspondence", "frozen")
MAX_PARTS = 64  # --parts: the smallest patch drawn (sample_patches) is 8 x 8 px, which splits into 64 parts of 1 px
# Flags that do not change a measurement's numbers: a rerun into one --out may differ in these only.
NOT_SETTINGS = ("init", "compare", "inits", "out", "device", "batch_size", "what", "data", "data_root")


# ----------------------------------------------------------------------------- encoder and crops

class BackboneFeatures(nn.Module):
    """A torchvision ResNet with fc = Identity, fed the way pretraining fed it (adam.imagenet_normalise,
    docs/METHOD.md §3). forward: B x C x S x S grey or RGB in [0, 1] -> B x D (global-average-pooled features)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(imagenet_normalise(x))  # B x D

    def feature_map(self, x):
        """The last conv map (layer4 output, stride 32): B x D x S/32 x S/32."""
        return feature_map(self.backbone, imagenet_normalise(x))


def render(img, box, frame=None):
    """Cut `frame` = (y, x, h, w) out of img (C x H x W), keeping only the pixels inside `box` and inside the
    image (the rest is 0). frame=None: frame = box (a plain crop, zero-padded at the border)."""
    frame = box if frame is None else frame
    fy, fx, fh, fw = frame
    out = np.zeros((img.shape[0], fh, fw), np.float32)
    y0, x0 = max(box[0], fy, 0), max(box[1], fx, 0)
    y1 = min(box[0] + box[2], fy + fh, img.shape[1])
    x1 = min(box[1] + box[3], fx + fw, img.shape[2])
    if y1 > y0 and x1 > x0:
        out[:, y0 - fy:y1 - fy, x0 - fx:x1 - fx] = img[:, y0:y1, x0:x1]
    return out


@torch.no_grad()
def embed(encoder, images, items, img_size, device="cpu", batch_size=64):
    """items: list of (image index, box, frame or None). Each is rendered, resized to img_size (bilinear with
    antialiasing: a linear map of the pixels, which the compositionality test relies on) and encoded.
    Batches are built lazily so thousands of patches never sit in memory at once. Returns N x D float64."""
    out = []
    for s in range(0, len(items), batch_size):
        x = torch.stack([
            F.interpolate(torch.from_numpy(render(images[i], box, frame))[None], size=(img_size, img_size),
                          mode="bilinear", align_corners=False, antialias=True)[0]
            for i, box, frame in items[s:s + batch_size]])
        out.append(encoder(x.to(device)).float().cpu().double())
    return torch.cat(out).numpy()


def l2n(z):
    # zero rows stay zero (a constant-zero encoder must not produce NaNs)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- 1. locality

def landmark_items(landmarks, patch):
    """A patch x patch box centred on every labelled landmark. landmarks: N x L x 2 (x, y), NaN = missing.
    Returns items for embed(), labels (landmark id) and groups (image id) for the grouped folds."""
    items, labels, groups = [], [], []
    for i in range(landmarks.shape[0]):
        for l, (x, y) in enumerate(landmarks[i]):
            if np.isfinite(x) and np.isfinite(y):
                box = (int(round(y)) - patch // 2, int(round(x)) - patch // 2, patch, patch)
                items.append((i, box, None))
                labels.append(l)
                groups.append(i)
    return items, np.array(labels), np.array(groups)


def knn_accuracy(feats, labels, groups, k=5, folds=5):
    """k-NN (cosine) landmark accuracy; folds grouped by image (GroupKFold), so the neighbours of a patch
    always come from other images. Ties: the earlier training sample, then the smaller label, so a constant
    encoder predicts one label for everything and scores exactly that label's share (chance)."""
    from sklearn.model_selection import GroupKFold
    z, correct = l2n(feats), 0
    for tr, te in GroupKFold(n_splits=min(folds, len(np.unique(groups)))).split(z, labels, groups):
        sim = z[te] @ z[tr].T  # Nte x Ntr
        nn_ = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(te), labels.max() + 1))
        np.add.at(votes, (np.arange(len(te))[:, None], labels[tr][nn_]), 1)
        correct += int((votes.argmax(1) == labels[te]).sum())
    return correct / len(labels)


def locality(encoder, images, landmarks, img_size, patch, k=5, folds=5, device="cpu", batch_size=64):
    from sklearn.metrics import silhouette_score
    items, labels, groups = landmark_items(landmarks, patch)
    if len(np.unique(groups)) < 2 or len(np.unique(labels)) < 2:
        raise ValueError(f"locality needs >= 2 images and >= 2 landmarks, got {len(np.unique(groups))} "
                         f"images and {len(np.unique(labels))} landmarks (see --landmarks / --num-images)")
    feats = embed(encoder, images, items, img_size, device, batch_size)
    counts = np.bincount(labels)
    res = {"knn_accuracy": knn_accuracy(feats, labels, groups, k, folds),
           "chance": float(counts.max() / counts.sum()),  # majority-class rate: what a constant encoder gets
           # silhouette on L2-normalised features (euclidean there ~ cosine); 0 for identical points
           "silhouette": float(silhouette_score(l2n(feats), labels)),
           "k": k, "folds": min(folds, len(np.unique(groups))), "patches": len(labels), "patch_px": patch}
    return res, feats, labels


def tsne(feats, labels, max_points=600, seed=0):
    """2-D t-SNE of (at most max_points of) the features -> (xy, labels of the points kept). One OpenMP
    thread: sklearn's threaded gradient oversubscribes a small shared CPU, and 600 points need no more."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    if len(feats) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(feats), max_points, replace=False))
        feats, labels = feats[keep], labels[keep]
    perplexity = float(min(30, max(2, (len(feats) - 1) / 3)))
    with threadpool_limits(1):
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(l2n(feats))
    return xy, labels


# ----------------------------------------------------------------------------- 2. compositionality

def split_box(box, n, rng):
    """Split box (y, x, h, w) into n parts that tile it exactly (no pixel lost or shared): repeatedly halve
    the largest part across its longer side, like the Anatomy Decomposer's cuts (docs/METHOD.md §2).
    n=2: two halves; n=3: a half and two quarters; n=4: a 2 x 2 grid (for a square-ish patch)."""
    parts = [tuple(box)]
    while len(parts) < n:
        j = max(range(len(parts)), key=lambda t: parts[t][2] * parts[t][3])
        y, x, h, w = parts.pop(j)
        vertical = w > h or (w == h and rng.random() < 0.5)  # vertical cut = left | right
        if vertical:
            parts += [(y, x, h, w // 2), (y, x + w // 2, h, w - w // 2)]
        else:
            parts += [(y, x, h // 2, w), (y + h // 2, x, h - h // 2, w)]
    if any(h < 1 or w < 1 for _, _, h, w in parts):
        raise ValueError(f"--parts {n}: a {box[2]}x{box[3]} px patch cannot be split into {n} parts of at least 1 px; "
                         f"use fewer --parts or a larger --comp-min")
    return parts


def sample_patches(rng, n_images, H, W, num, min_frac, max_frac):
    """num random (image, box) with sides uniform in [min_frac, max_frac] of the image side, inside it."""
    out = []
    for _ in range(num):
        h = int(rng.integers(max(8, round(min_frac * H)), max(9, round(max_frac * H)) + 1))
        w = int(rng.integers(max(8, round(min_frac * W)), max(9, round(max_frac * W)) + 1))
        h, w = min(h, H), min(w, W)
        out.append((int(rng.integers(n_images)), (int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1)), h, w)))
    return out


def compositionality(encoder, images, img_size, parts=(2, 3, 4), num=100, min_frac=0.25, max_frac=0.6,
                     mode="resize", seed=0, device="cpu", batch_size=64, baseline=False):
    """cos(f(whole), sum_i f(part_i)) per split count n. mode="resize": every part resized on its own to
    img_size (the paper's protocol). mode="pad": each part stays in the whole's frame, zeros elsewhere, and
    that frame is resized like the whole: the parts then add up exactly to the whole, so a linear encoder
    scores exactly 1 (a check of the arithmetic, not a protocol). Returns {n: cosines (num,)}.
    baseline=True also returns {n: cosines of each whole with the parts of the next patch} (another patch,
    usually another image): a network whose features all point the same way (a random ReLU network does)
    scores high on both, so the gap between the two is the part that is about composition."""
    if mode not in ("resize", "pad"):
        raise ValueError(f"--comp-mode must be resize or pad, got {mode!r}")
    rng = np.random.default_rng(seed)
    _, H, W = images[0].shape
    out, shuffled = {}, {}
    for n in parts:
        items, spans = [], []
        for i, box in sample_patches(rng, len(images), H, W, num, min_frac, max_frac):
            sub = split_box(box, n, rng)
            spans.append((len(items), len(sub)))
            items.append((i, box, None))
            items += [(i, p, box if mode == "pad" else None) for p in sub]
        z = embed(encoder, images, items, img_size, device, batch_size)
        whole = np.stack([z[s] for s, _ in spans])                       # num x D
        summed = np.stack([z[s + 1:s + 1 + m].sum(0) for s, m in spans])  # num x D
        out[n] = (l2n(whole) * l2n(summed)).sum(1)
        shuffled[n] = (l2n(whole) * l2n(np.roll(summed, 1, axis=0))).sum(1)
    return (out, shuffled) if baseline else out


def describe(c):
    """Mean, std, quartiles and count of a sample of cosines."""
    q = np.percentile(c, [25, 50, 75])
    return {"mean": float(c.mean()), "std": float(c.std()), "q25": float(q[0]), "median": float(q[1]),
            "q75": float(q[2]), "n": int(len(c))}


# ----------------------------------------------------------------------------- 3. dense correspondence

def affine(H, W, rotate=0.0, scale=1.0, shift=(0.0, 0.0)):
    """2 x 3 matrix mapping a pixel (x, y) of A to its place in B: rotation (degrees, counter-clockwise on
    screen) and scale about the image centre, then a shift given as fractions of (W, H)."""
    a = np.deg2rad(rotate)
    M = scale * np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])  # y points down
    c = np.array([(W - 1) / 2, (H - 1) / 2])
    t = c - M @ c + np.array([shift[0] * W, shift[1] * H])
    return np.concatenate([M, t[:, None]], 1)


def apply_affine(T, pts):
    return pts @ T[:, :2].T + T[:, 2]


def warp(img, T):
    """B = A moved by T (bilinear, zeros outside): B(p) = A(T^-1 p). img: C x H x W."""
    from scipy.ndimage import affine_transform
    Minv = np.linalg.inv(T[:, :2])
    P = np.array([[0, 1], [1, 0]])  # scipy works in (row, col) = (y, x)
    M_rc = P @ Minv @ P
    off = -P @ Minv @ T[:, 2]
    return np.stack([affine_transform(ch, M_rc, offset=off, order=1, cval=0.0) for ch in img]).astype(np.float32)


def fit_affine(src, dst):
    """Least-squares affine src -> dst from point pairs (L x 2 each, NaN rows ignored)."""
    ok = np.isfinite(src).all(1) & np.isfinite(dst).all(1)
    if ok.sum() < 3:
        raise ValueError(f"need >= 3 landmark pairs to fit the true affine, got {ok.sum()}")
    X = np.concatenate([src[ok], np.ones((ok.sum(), 1))], 1)
    return np.linalg.lstsq(X, dst[ok], rcond=None)[0].T  # 2 x 3


def cells(H, W, G):
    """Boxes of a G x G grid tiling H x W exactly, row-major, and their centres (x, y). Pixel coordinates
    follow array indices: pixel (x, y) covers [x - 0.5, x + 0.5) x [y - 0.5, y + 0.5)."""
    ys, xs = np.linspace(0, H, G + 1).round().astype(int), np.linspace(0, W, G + 1).round().astype(int)
    boxes = [(ys[r], xs[c], ys[r + 1] - ys[r], xs[c + 1] - xs[c]) for r in range(G) for c in range(G)]
    centres = np.array([(x + w / 2 - 0.5, y + h / 2 - 0.5) for y, x, h, w in boxes])
    return boxes, centres


def cell_of(xy, H, W, G):
    """Row-major cell index of points xy (N x 2) in the grid of cells(); -1 where outside the image."""
    ys, xs = np.linspace(0, H, G + 1).round(), np.linspace(0, W, G + 1).round()
    r = np.searchsorted(ys, xy[:, 1] + 0.5, side="right") - 1
    c = np.searchsorted(xs, xy[:, 0] + 0.5, side="right") - 1
    inside = (r >= 0) & (r < G) & (c >= 0) & (c < G) & np.isfinite(xy).all(1)
    return np.where(inside, r * G + c, -1)


def grid_features(encoder, img, G, img_size, mode="patch", context=2.0, device="cpu", batch_size=64):
    """G*G x D features of one image (C x H x W).
    patch: the paper's "grid of patches" - each cell, with a window context x its side around it (zeros
           beyond the border), embedded on its own at img_size (what the encoder saw in pretraining: parts).
    map:   the last conv map (layer4) of the whole image at img_size, average-pooled to G x G, or bilinearly
           upsampled when the map is smaller than G (then neighbouring cells share information)."""
    _, H, W = img.shape
    if mode == "patch":
        boxes, _ = cells(H, W, G)
        items = []
        for y, x, h, w in boxes:
            ch, cw = int(round(h * context)), int(round(w * context))
            items.append((0, (y + h // 2 - ch // 2, x + w // 2 - cw // 2, ch, cw), None))
        return embed(encoder, [img], items, img_size, device, batch_size)
    if mode == "map":
        x = F.interpolate(torch.from_numpy(img)[None], size=(img_size, img_size), mode="bilinear",
                          align_corners=False, antialias=True)
        with torch.no_grad():
            f = encoder.feature_map(x.to(device)).float().cpu()  # 1 x D x h x w
        f = F.adaptive_avg_pool2d(f, G) if f.shape[-1] >= G else F.interpolate(f, size=(G, G), mode="bilinear",
                                                                               align_corners=False)
        return f[0].flatten(1).T.double().numpy()
    raise ValueError(f"--grid-mode must be patch or map, got {mode!r}")


def correspond(fa, fb, T, H, W, G, lm_a=None, lm_b=None):
    """Match every A cell to the B cell of highest cosine and score it against the true map T (A -> B).
    lm_a, lm_b: L x 2 landmarks; a landmark's predicted place is its matched cell's centre plus its offset
    from its own cell's centre (so a perfect match gives 0 px error)."""
    sim = l2n(fa) @ l2n(fb).T                      # G*G x G*G
    nn_ = sim.argmax(1)
    _, cen = cells(H, W, G)
    true = cell_of(apply_affine(T, cen), H, W, G)
    valid = true >= 0  # cells whose true match lies inside B
    cheb = np.maximum(np.abs(nn_ // G - true // G), np.abs(nn_ % G - true % G))
    res = {"cells": int(valid.sum()),  # None: undefined, no cell's true match lies inside B
           "within_one_cell": float((cheb[valid] <= 1).mean()) if valid.any() else None,
           "exact_cell": float((cheb[valid] == 0).mean()) if valid.any() else None}
    if lm_a is not None:
        lm_b = apply_affine(T, lm_a) if lm_b is None else lm_b
        a = cell_of(lm_a, H, W, G)
        ok = (a >= 0) & (cell_of(lm_b, H, W, G) >= 0)  # landmarks inside both images
        pred = cen[nn_[a[ok]]] + (lm_a[ok] - cen[a[ok]])
        err = np.linalg.norm(pred - lm_b[ok], axis=1)
        res.update(landmark_error_px=float(err.mean()), landmark_error_median_px=float(np.median(err)))
    return res, {"nn": nn_, "sim": sim.max(1), "ok": valid & (cheb <= 1), "valid": valid}


# ----------------------------------------------------------------------------- data

def read_dicom_grey(path, size):
    """RG1_UNCR.dcm-like radiograph (or any image) -> 1 x size x size float in [0, 1], through data_prep.read_image:
    DICOM with the 1st..99th percentile window (RG1's header window is the whole 15-bit range, too flat to see
    anything; MONOCHROME1 inverted so bone is bright as in the PNG datasets), centre-cropped to a square (no
    distortion) and resized."""
    im, _ = data_prep.read_image(path, 1, size, fit="crop", dicom_window="percentile")
    return (np.asarray(im, np.float32) / 255)[None]


def read_landmark_csv(path, names_in_cache):
    """CSV rows name,landmark,x,y (x, y in pixels of the cached image) -> (N x L x 2 with NaN for missing,
    landmark names in order of first appearance). name = the image's `name` column in index.csv."""
    import csv
    row_of = {n: i for i, n in enumerate(names_in_cache)}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"name", "landmark", "x", "y"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a header name,landmark,x,y and at least one row")
    lnames = list(dict.fromkeys(r["landmark"] for r in rows))
    out = np.full((len(names_in_cache), len(lnames), 2), np.nan, np.float32)
    for r in rows:
        if r["name"] in row_of:
            out[row_of[r["name"]], lnames.index(r["landmark"])] = float(r["x"]), float(r["y"])
    if np.isnan(out).all():
        raise ValueError(f"{path}: no row's name matches an image of the selected split in the cache")
    return out, lnames


def load_data(args):
    if args.landmarks and not Path(args.landmarks).is_file():
        raise FileNotFoundError(f"--landmarks {args.landmarks}: no such file")
    root = data_prep.dataset_root(args.data, args.data_root)
    cache = data_prep.open_dataset(args.data, args.data_root)  # as adam.py opens it; a missing phantom is generated
    rows = cache.rows(args.split)[:args.num_images]
    if len(rows) < 2:
        raise ValueError(f"{root}: split {args.split!r} has {len(rows)} images, need >= 2 (see --split)")
    imgs = np.asarray(cache.images[rows], np.float32) / 255
    imgs = imgs[:, None] if imgs.ndim == 3 else imgs.transpose(0, 3, 1, 2)  # N x C x H x W
    lnames = list(cache.meta.get("landmark_names", []))
    lms = None if cache.landmarks is None else np.asarray(cache.landmarks[rows], np.float32)
    if args.landmarks:
        lms, lnames = read_landmark_csv(args.landmarks, [cache.index[r]["name"] for r in rows])
    return root, imgs, lms, lnames


# ----------------------------------------------------------------------------- figures, output

def save_fig(fig, path):
    import matplotlib.pyplot as plt
    out = write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return out


def plt_():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fig_tsne(points, path, lnames):
    """points: {init: (xy N x 2, labels N)} -> one panel per init, coloured by landmark."""
    plt = plt_()
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(lnames) <= 10 else "tab20")
    for ax, (name, (xy, lab)) in zip(axes[0], points.items()):
        for l in np.unique(lab):
            ax.scatter(*xy[lab == l].T, s=8, color=cmap(l % cmap.N), label=lnames[l] if l < len(lnames) else l)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, -1].legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1, 0.5))
    return save_fig(fig, path)


def fig_kde(cos, path):
    """cos: {init: {n: cosines}} or {init: ({n: cosines}, {n: shuffled baseline cosines})} -> a panel per
    split count, a KDE curve per init (the baseline's mean as a dashed line of the same colour)."""
    base = {name: c[1] for name, c in cos.items() if isinstance(c, tuple)}
    cos = {name: c[0] if isinstance(c, tuple) else c for name, c in cos.items()}
    from scipy.stats import gaussian_kde
    plt = plt_()
    ns = sorted({n for c in cos.values() for n in c})
    fig, axes = plt.subplots(1, len(ns), figsize=(4 * len(ns), 3.2), squeeze=False)
    for ax, n in zip(axes[0], ns):
        allv = np.concatenate([c[n] for c in cos.values()])
        lo, hi = allv.min(), max(allv.max(), 1.0)
        x = np.linspace(lo - 0.1 * (hi - lo) - 1e-3, hi + 0.05 * (hi - lo) + 1e-3, 400)  # zoom on the data
        for k, (name, c) in enumerate(cos.items()):
            v = c[n]
            if np.ptp(v) > 1e-9:
                ax.plot(x, gaussian_kde(v)(x), color=f"C{k}", label=f"{name} (mean {v.mean():.3f})")
            else:  # a point mass has no KDE: draw it as a line
                ax.axvline(v[0], color=f"C{k}", label=f"{name} (all {v[0]:.3f})")
            if name in base:
                ax.axvline(base[name][n].mean(), color=f"C{k}", ls="--", lw=0.8)
        ax.set_title(f"whole vs sum of {n} parts (dashed: another patch's parts)", fontsize=8)
        ax.set_xlabel("cosine")
        ax.legend(fontsize=7)
    return save_fig(fig, path)


def fig_matches(panels, path, threshold, max_lines):
    """panels: {(init, case): (imgA, imgB, match dict, numbers)} -> rows = inits, columns = cases; lines
    join cell centres with cosine >= threshold (the best max_lines): green = within one cell of the truth,
    red = farther, yellow = the cell's true match lies outside B (no truth)."""
    plt = plt_()
    inits = list(dict.fromkeys(k[0] for k in panels))
    cases = list(dict.fromkeys(k[1] for k in panels))
    fig, axes = plt.subplots(len(inits), len(cases), figsize=(5 * len(cases), 2.7 * len(inits)), squeeze=False)
    for (name, case), (a, b, m, num) in panels.items():
        ax = axes[inits.index(name), cases.index(case)]
        _, H, W = a.shape
        ax.imshow(np.concatenate([a.mean(0), b.mean(0)], 1), cmap="gray", vmin=0, vmax=1)
        G = int(round(np.sqrt(len(m["nn"]))))
        _, cen = cells(H, W, G)
        keep = np.where(m["sim"] >= threshold)[0]
        keep = keep[np.argsort(-m["sim"][keep])][:max_lines]
        for j in keep:
            (xa, ya), (xb, yb) = cen[j], cen[m["nn"][j]]
            ax.plot([xa, xb + W], [ya, yb], lw=0.7,
                    color="lime" if m["ok"][j] else "red" if m["valid"][j] else "yellow")
        within = "undefined" if num["within_one_cell"] is None else f"{num['within_one_cell']:.2f}"
        ax.set_title(f"{name} | {case}: {within} within 1 cell, "
                     f"{len(keep)} drawn >= {threshold}", fontsize=7)
        ax.axis("off")
    return save_fig(fig, path)


# ----------------------------------------------------------------------------- main

def get_args(argv=None):
    p = runs.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    n1, real = runs.number(int, 1), runs.number(float)  # argparse types: flags checked when parsed
    frac = runs.number(float, 0, 1, low_open=True)
    g = p.add_argument_group("encoders")
    g.add_argument("--init", action="append", default=[],
                   help="encoder to measure, repeatable: random | adam:PATH | moco:PATH | torchvision:PATH "
                        "(finetune.load_backbone forms); prefix NAME= to name it in tables (default: random)")
    g.add_argument("--compare", nargs="*", default=None, metavar="INIT",
                   help="put all inits side by side in one figure per measurement (without it: a figure per "
                        "init); inits listed after it are added to --init's")
    g.add_argument("--arch", default="resnet50", choices=ARCHS, help="backbone the checkpoints were trained with")
    g.add_argument("--img-size", type=runs.number(int, 16), default=224,
                   help="encoder input side (paper: 224); 64 is enough for a CPU demo with resnet18")
    g.add_argument("--device", type=runs.device, default="auto", help="auto (cuda where torch sees a GPU, else "
                   "cpu), cpu, cuda or cuda:N")
    g.add_argument("--batch-size", type=n1, default=64)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="phantom",
                   help="a dataset name (as adam.py's --data) or a data_prep.py cache folder; phantom is generated "
                        "when missing")
    g.add_argument("--data-root", default=None, help="where a named dataset lives (default data/<name>)")
    g.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split's images to use")
    g.add_argument("--num-images", type=runs.number(int, 2), default=50,
                   help="first N images of the split; locality uses all, correspondence --corr-pairs of them")
    g.add_argument("--landmarks", default=None,
                   help="CSV name,landmark,x,y (cached-image pixels) for data without landmarks.npy")
    g.add_argument("--dicom", default="RG1_UNCR.dcm",
                   help="radiograph for the self-correspondence demo: a path, a pydicom-data test file name, "
                        "or 'none'")
    g = p.add_argument_group("measurements")
    g.add_argument("--what", default=",".join(WHAT[:3]), help="comma list of " + ", ".join(WHAT) + " (default: the "
                   "paper's three; frozen = the frozen-feature measures of docs/learning.md, random init added)")
    g.add_argument("--seed", type=runs.seed, default=0, help="patch sampling, random init, t-SNE")
    g.add_argument("--patch-frac", type=frac, default=0.22,
                   help="locality patch side / image side (paper: 224 px patches on 1024 px images)")
    g.add_argument("--tsne-points", type=runs.number(int, 3), default=600,
                   help="t-SNE figure draws at most this many patches (t-SNE is the slow part on a CPU)")
    g.add_argument("--knn-k", type=n1, default=5, help="neighbours that vote in the k-NN landmark accuracy")
    g.add_argument("--folds", type=runs.number(int, 2), default=5, help="group k-fold by image for the k-NN accuracy")
    g.add_argument("--parts", default="2,3,4",
                   help=f"compositionality split counts, each in 2..{MAX_PARTS} (an 8 px patch has 64 pixels)")
    g.add_argument("--num-patches", type=n1, default=50,
                   help="compositionality patches per split count (the KDE needs ~50; more for tight numbers)")
    g.add_argument("--comp-min", type=frac, default=0.25, help="smallest whole patch side / image side")
    g.add_argument("--comp-max", type=frac, default=0.6, help="largest whole patch side / image side")
    g.add_argument("--comp-mode", default="resize", choices=["resize", "pad"],
                   help="resize: each part resized on its own (paper); pad: parts kept in the whole's frame")
    g.add_argument("--grid", type=n1, default=8, help="correspondence grid is G x G cells")
    g.add_argument("--grid-mode", default="patch", choices=["patch", "map"],
                   help="patch: each cell (with context) embedded on its own, as the paper; map: last conv map")
    g.add_argument("--context", type=runs.number(float, 1, 16), default=2.0,
                   help="patch mode: window side / cell side (1 = the cell alone)")
    g.add_argument("--rotate", type=real, default=10.0, help="self-correspondence rotation, degrees")
    g.add_argument("--scale", type=runs.number(float, 0.1, 10), default=1.1, help="self-correspondence scale")
    g.add_argument("--shift", type=runs.number(float, -1, 1), nargs=2, default=(0.05, 0.03),
                   help="shift, fractions of (W, H)")
    g.add_argument("--corr-pairs", type=n1, default=4, help="images used for correspondence numbers")
    g.add_argument("--match-threshold", type=runs.number(float, -1, 1), default=0.8,
                   help="draw matches with cosine >= this")
    g.add_argument("--max-lines", type=runs.number(int, 0), default=40, help="at most this many match lines per panel")
    g.add_argument("--frozen-size", type=runs.number(int, 32), default=None,
                   help="frozen measures: the side the whole images are fed at (default: the cache's side)")
    g.add_argument("--draws", type=n1, default=5, help="frozen measures: random choices of the 3 / 12 probe images")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=runs.out_folder, default="runs/eve",
                   help="folder for eve.json and the PNG figures; a rerun with the same data and settings adds its "
                        "encoders to eve.json")
    args = p.parse_args(argv)
    args.device = runs.resolve_device(args.device)
    what = args.what
    args.what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in args.what if w not in WHAT]
    if bad or not args.what:
        p.error(f"--what {what!r}: {f'unknown {bad}' if bad else 'names nothing'}, choose from {', '.join(WHAT)}")
    try:
        args.parts = [int(n) for n in args.parts.split(",")]
    except ValueError:
        p.error(f"--parts {args.parts!r}: expected a comma list of integers such as 2,3,4")
    if any(not 2 <= n <= MAX_PARTS for n in args.parts):
        p.error(f"--parts: split counts must be in 2..{MAX_PARTS} (an 8 px patch, the smallest drawn, has 64 pixels), "
                f"got {args.parts}")
    if args.comp_min > args.comp_max:
        p.error(f"--comp-min {args.comp_min:g} is above --comp-max {args.comp_max:g}")
    args.inits = (args.init + (args.compare or [])) or ["random"]
    if "frozen" in args.what and "random" not in args.inits:   # the frozen table always shows random init
        args.inits.append("random")
    return args



def init_name(init):
    if "=" in init.split(":")[0]:
        return init.split("=", 1)
    kind, _, path = init.partition(":")
    return (f"{kind}:{Path(path).name}" if path else kind), init


def load_encoder(spec, arch, seed, device):
    """The encoder of an --init SPEC (finetune.load_backbone forms), in eval mode on `device`. torch is seeded first,
    so that a random init is the same in every run of one seed (ablate.py measures the same one)."""
    torch.manual_seed(seed)
    return BackboneFeatures(load_backbone(spec, arch)).to(device).eval()


def measure_one(enc, args, imgs, lms, dicom, dev):
    """All requested measurements for one encoder -> (numbers, things the figures need)."""
    res, extra, sec, t0 = {}, {}, {}, time.time()
    H, W = imgs.shape[2:]
    if "locality" in args.what:
        if lms is None:
            res["locality"] = {"skipped": "no landmarks in the cache; pass --landmarks CSV"}
            print("  locality skipped: the cache has no landmarks.npy; pass --landmarks CSV")
        else:
            patch = max(8, int(round(args.patch_frac * min(H, W))))
            res["locality"], feats, labels = locality(enc, imgs, lms, args.img_size, patch, args.knn_k,
                                                      args.folds, dev, args.batch_size)
            sec["locality"] = round(time.time() - t0, 2)
            t = time.time()
            extra["tsne"] = tsne(feats, labels, args.tsne_points, args.seed)
            sec["tsne"] = round(time.time() - t, 2)
    if "compositionality" in args.what:
        t0 = time.time()
        cos, base = compositionality(enc, imgs, args.img_size, args.parts, args.num_patches, args.comp_min,
                                     args.comp_max, args.comp_mode, args.seed, dev, args.batch_size, baseline=True)
        res["compositionality"] = {str(n): describe(c) | {"shuffled_mean": float(base[n].mean()),
                                                           "gap": float(c.mean() - base[n].mean())}
                                   for n, c in cos.items()}
        sec["compositionality"] = round(time.time() - t0, 2)
        extra["cos"] = cos, base
    if "correspondence" in args.what:
        t0 = time.time()
        kw = dict(G=args.grid, img_size=args.img_size, mode=args.grid_mode, context=args.context, device=dev,
                  batch_size=args.batch_size)
        T = affine(H, W, args.rotate, args.scale, args.shift)
        cases, panels = {"self": [], "pair": []}, {}
        P = min(args.corr_pairs, len(imgs))
        for i in range(P):
            a = imgs[i]
            b = warp(a, T)
            fa = grid_features(enc, a, **kw)
            num, m = correspond(fa, grid_features(enc, b, **kw), T, H, W, args.grid,
                                None if lms is None else lms[i])
            cases["self"].append(num)
            panels.setdefault("self (affine)", (a, b, m, num))
            if lms is not None and P > 1:
                j = (i + 1) % P
                Tp = fit_affine(lms[i], lms[j])
                b = imgs[j]
                num, m = correspond(fa, grid_features(enc, b, **kw), Tp, H, W, args.grid, lms[i], lms[j])
                cases["pair"].append(num)
                panels.setdefault("pair (two images)", (a, b, m, num))
        if dicom is not None:
            Hd, Wd = dicom.shape[1:]
            Td = affine(Hd, Wd, args.rotate, args.scale, args.shift)
            b = warp(dicom, Td)
            num, m = correspond(grid_features(enc, dicom, **kw), grid_features(enc, b, **kw), Td, Hd, Wd,
                                args.grid)
            cases["dicom_self"] = [num]
            panels["self (RG1_UNCR.dcm)"] = (dicom, b, m, num)
        res["correspondence"] = {k: mean_defined(vs) for k, vs in cases.items() if vs}
        res["correspondence"]["grid"] = (f"{args.grid}x{args.grid} cells, " + (
            f"each cell with a {args.context}x window embedded at {args.img_size}px (paper's grid of patches)"
            if args.grid_mode == "patch" else "layer4 map pooled/upsampled to the grid"))
        res["correspondence"]["truth"] = ("self: the known affine; pair: the least-squares affine fitted to the "
                                          "landmark pairs (cells), the landmarks themselves (landmark error)")
        sec["correspondence"] = round(time.time() - t0, 2)
        extra["panels"] = panels
    if "frozen" in args.what:
        t0 = time.time()
        cache = data_prep.open_dataset(args.data, args.data_root)
        res["frozen"] = probes.headline(probes.measure(enc.backbone, cache, args.frozen_size, draws=args.draws,
                                                       test_images=max(args.num_images, 2), seed=args.seed,
                                                       device=dev))
        sec["frozen"] = round(time.time() - t0, 2)
    res["seconds"] = sec
    return res, extra


def print_frozen(results):
    """The frozen measures, one row each: the no-look baseline (the same for every encoder), then each encoder."""
    names = [n for n in results if isinstance(results[n].get("frozen"), dict)]
    if not names:
        return
    rows = results[names[0]]["frozen"]
    keys = [k for k in rows if "nolook" not in k]
    w = max(len(k) for k in keys)
    cell = lambda v, n: f"{v:>{n}.3f}" if isinstance(v, float) else f"{'-' if v is None else 'undefined':>{n}}"
    print("frozen features (*_px: lower is better; the rest: higher)")
    print(f"{'measure':<{w}} {'no look':>10} " + " ".join(f"{n[:14]:>14}" for n in names))
    for k in keys:
        base = probes.nolook(rows, k)
        print(f"{k:<{w}} {cell(base, 10)} " + " ".join(cell(results[n]["frozen"].get(k), 14) for n in names))


def mean_defined(numbers):
    """The mean of each key over images where it is defined (not None), with the count; a key defined on no image is
    None and said under "undefined" with its reason, never averaged in."""
    out, why = {"images": len(numbers)}, {}
    for key in numbers[0]:
        vals = [v[key] for v in numbers if v[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
        if len(vals) < len(numbers):
            why[key] = (f"defined on {len(vals)} of {len(numbers)} images: on the others no cell's true match lies "
                        f"inside the second image (--rotate, --scale, --shift move it out)")
    return out | ({"undefined": why} if why else {})


def print_table(results):
    names = list(results)
    rows = []
    for name in names:
        for meas, d in results[name].items():
            if meas not in WHAT or meas == "frozen":  # seconds, the row's init, data and settings; frozen: print_frozen
                continue
            for k, v in d.items():
                if isinstance(v, dict):
                    for k2, v2 in v.items():
                        if isinstance(v2, float):
                            rows.append((f"{meas}.{k}.{k2}", name, v2))
                elif isinstance(v, float):
                    rows.append((f"{meas}.{k}", name, v))
    keys = list(dict.fromkeys(r[0] for r in rows))
    table = {(r[0], r[1]): r[2] for r in rows}
    w = max([len(k) for k in keys] + [10])
    print(f"{'metric':<{w}} " + " ".join(f"{n[:22]:>22}" for n in names))
    for k in keys:
        print(f"{k:<{w}} " + " ".join(f"{table[(k, n)]:>22.4f}" if (k, n) in table else f"{'-':>22}"
                                      for n in names))


def read_earlier(out, args, data, inits):
    """OUT/eve.json of an earlier run, to which this run adds its encoders, or None. Refused, naming the flag: a file
    of another shape, other data, another setting, or an encoder NAME measured earlier from another SPEC."""
    path = out / "eve.json"
    earlier = runs.read_json(path, "--out", "an eve.py output (its encoders' results, settings and data)",
                             lambda e: all(isinstance(e[k], dict) for k in ("results", "settings", "figures", "data")))
    if earlier is None:
        return None
    runs.check_data("--data-root" if args.data_root else "--data", args.data_root or args.data, earlier["data"], data,
                    f"the measurements in {path}")
    mine = settings_of(args)
    for key, value in earlier["settings"].items():
        if mine.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {mine.get(key)}: {path} holds measurements with {flag} {value}: pass that to add "
                             f"encoders to it, or pick another --out")
    for name, spec in inits:
        old = earlier["results"].get(name, {}).get("init")
        if old not in (None, spec):
            raise ValueError(f"--init {name}={spec}: {path} holds {name} measured from {old}; give this encoder "
                             f"another NAME= or pick another --out")
    return earlier


def settings_of(args):
    """The flags that change the numbers, as JSON holds them."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}))


def figure_path(out, stem, tag, names, shown):
    """OUT/<stem><tag>.png, unless an earlier run's figure of that name shows other encoders (shown: file name ->
    encoders): then a name of its own, so that no figure of an earlier run is overwritten."""
    path = out / f"{stem}{tag}.png"
    if not set(shown.get(path.name, names)) <= set(names):
        path = out / f"{stem}_{'_'.join(''.join(ch if ch.isalnum() else '_' for ch in n) for n in names)}.png"
    return path


def main(argv=None):
    args = get_args(argv)
    with runs.locked(args.out, "eve.py"):
        return _main(args, Path(args.out))


def _main(args, out):
    root, imgs, lms, lnames = load_data(args)
    data = runs.data_identity(root)
    inits = [init_name(init) for init in args.inits]
    earlier = read_earlier(out, args, data, inits)
    if "correspondence" in args.what and args.grid > min(imgs.shape[2:]):
        raise ValueError(f"--grid {args.grid}: the {imgs.shape[2]}x{imgs.shape[3]} images cannot be cut into "
                         f"{args.grid}x{args.grid} cells of at least 1 px")
    dicom = None
    if "correspondence" in args.what and args.dicom.lower() != "none":
        path = args.dicom
        if not Path(path).exists():
            from pydicom.data import get_testdata_file
            path = get_testdata_file(args.dicom)
            if path is None:
                raise FileNotFoundError(f"--dicom {args.dicom}: not a file and not a pydicom-data test file "
                                        "(pip install pydicom-data, or pass --dicom none)")
        dicom = read_dicom_grey(path, max(imgs.shape[2:]))
    print(f"eve: {len(imgs)} {args.split} images {tuple(imgs.shape[1:])} from {root}, arch {args.arch}, "
          f"input {args.img_size}px, measuring {args.what} for {len(args.inits)} encoder(s)")
    results, extras = {}, {}
    for name, spec in inits:
        t0 = time.time()
        enc = load_encoder(spec, args.arch, args.seed, args.device)
        results[name], extras[name] = measure_one(enc, args, imgs, lms, dicom, args.device)
        results[name]["seconds"]["total"] = round(time.time() - t0, 2)
        results[name] |= {"init": spec, "data": data, "settings": settings_of(args)}
        print(f"  {name}: {results[name]['seconds']}")
    print_table(results)
    print_frozen(results)
    # --compare: one figure per measurement with every init side by side; else one set per init
    groups = [list(extras)] if args.compare is not None or len(extras) == 1 else [[n] for n in extras]
    figures, shown = {}, (earlier or {}).get("figure_inits", {})
    for names in groups:
        ex = {n: extras[n] for n in names}
        tag = "" if len(groups) == 1 else "_" + "".join(ch if ch.isalnum() else "_" for ch in names[0])
        path = lambda stem: figure_path(out, stem, tag, names, shown)
        if any("tsne" in e for e in ex.values()):
            figures["locality" + tag] = fig_tsne({n: e["tsne"] for n, e in ex.items() if "tsne" in e},
                                                 path("eve_locality_tsne"), lnames)
        if any("cos" in e for e in ex.values()):
            figures["compositionality" + tag] = fig_kde({n: e["cos"] for n, e in ex.items() if "cos" in e},
                                                        path("eve_compositionality_kde"))
        if any("panels" in e for e in ex.values()):
            figures["correspondence" + tag] = fig_matches(
                {(n, c): v for n, e in ex.items() for c, v in e.get("panels", {}).items()},
                path("eve_correspondence"), args.match_threshold, args.max_lines)
        shown |= {Path(figures[m + tag]).name: names for m in ("locality", "compositionality", "correspondence")
                  if m + tag in figures}
    # an earlier run's encoders and figures stay; this run's are added (an encoder measured again: its new numbers)
    summary = earlier or {"results": {}, "figures": {}}
    summary |= {"args": vars(args), "data": data, "settings": settings_of(args), "data_root": str(root),
                "images": list(imgs.shape), "landmark_names": lnames, "figure_inits": shown}
    for name, res in results.items():
        summary["results"][name] = summary["results"].get(name, {}) | res
    for key, file in figures.items():  # an earlier run's figure under the same key stays, named by its file
        summary["figures"][key if summary["figures"].get(key) in (None, file) else Path(file).stem] = file
    runs.write_json(out / "eve.json", summary)
    print(f"wrote {out / 'eve.json'} and {len(figures)} figure(s): {', '.join(figures.values())}")
    return summary | {"out": str(out), "figures": figures}


if __name__ == "__main__":  # bad input, a full disk, a busy --out, Ctrl-C or SIGTERM: one line, no traceback
    runs.command_line("eve.py", main, (OSError, ValueError, data_prep.DataError),
                      note=lambda: f"nothing was written (eve.json is written when every encoder is measured): run the "
                                   f"same command again")
