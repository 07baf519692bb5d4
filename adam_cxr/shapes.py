"""The known-answer data set of the learning test (docs/learning.md): images of one shape class each.

Each image holds copies of ONE shape (disc, square, triangle, cross, ring, bar, L or star), each copy with its own
position, size and rotation, brighter than a flat background, with noise; grey levels vary a little between images
and the copies are as many in every image. The class is then the only thing two images share that the views keep,
besides the layout of the copies, which the crops move. A frozen linear probe (and k-NN) of the class lifts above a
random init only if pretraining learned the shapes: what docs/learning.md measures. Written as a data_prep cache
(images.npy, index.csv, meta.json, labels = the class), so adam.py trains on it with `--data <folder>`.
"""
import csv
import json
import math
import os
from pathlib import Path

import numpy as np

CLASSES = ("disc", "square", "triangle", "cross", "ring", "bar", "L", "star")
SHAPES_VERSION = 3


def _inside(cls, u, v):
    """Boolean mask of the shape `cls` at local coordinates (u, v) in [-1, 1] (rotation already applied)."""
    r, au, av = np.hypot(u, v), np.abs(u), np.abs(v)
    if cls == "disc":
        return r <= 1
    if cls == "square":
        return (au <= 0.8) & (av <= 0.8)
    if cls == "triangle":                       # upward triangle: below the two slanted edges, above the base
        return (v <= 0.7) & (v >= -0.9 + 1.6 * au)
    if cls == "cross":
        return ((au <= 0.3) & (av <= 1)) | ((av <= 0.3) & (au <= 1))
    if cls == "ring":
        return (r <= 1) & (r >= 0.55)
    if cls == "bar":
        return (au <= 1) & (av <= 0.28)
    if cls == "L":
        return ((u >= -0.8) & (u <= -0.3) & (av <= 0.9)) | ((u >= -0.8) & (u <= 0.8) & (v >= 0.4) & (v <= 0.9))
    if cls == "star":                           # five points: radius modulated by the angle
        return r <= 0.4 + 0.6 * ((1 + np.cos(5 * np.arctan2(u, -v))) / 2) ** 3
    raise ValueError(f"unknown shape class {cls!r}; choose from {CLASSES}")


def default_copies(size):
    return max(4, round(8 * size / 64))


def shapes_sample(i, size=64, seed=0, copies=None):
    """Image i: (H x W uint8, class index). Deterministic in (seed, i). copies: shapes per image (default 8 at 64 px,
    4 at 32 px, each of radius 3.5-6.5 px anywhere); 1: one large shape near the centre (radius 25-40 % of the side)."""
    copies = copies or default_copies(size)
    rng = np.random.default_rng([seed, i, 7])
    label = int(rng.integers(len(CLASSES)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # grey levels that vary little between images: a grey level of the image's own would be the easiest cue to tell
    # images apart, and the views' jitter that hides it also slows learning at this scale (docs/learning.md)
    bg, fg = rng.uniform(0.3, 0.4), rng.uniform(0.6, 0.7)
    img = np.full((size, size), bg, np.float32)
    mask = np.zeros((size, size), bool)
    for _ in range(copies):  # copies of the class, each its own pose; as many in every image
        # (a count or a background texture of the image's own would be an instance cue beside the class)
        cx, cy = rng.uniform(0.3, 0.7, 2) * size if copies == 1 else rng.uniform(0, size, 2)
        s = rng.uniform(0.25, 0.4) * size if copies == 1 else rng.uniform(3.5, 6.5)  # radius in pixels
        th = rng.uniform(0, 2 * math.pi)
        du, dv = (xx - cx) / s, (yy - cy) / s
        u, v = math.cos(th) * du + math.sin(th) * dv, -math.sin(th) * du + math.cos(th) * dv
        mask |= _inside(CLASSES[label], u, v)
    img = np.where(mask, fg, img) + rng.normal(0, 0.03, (size, size))
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), label


def build_shapes(out, num_images=3000, size=64, seed=0, copies=None):
    """Write the shapes cache at `out` (train 60 % / val 5 % / test 35 %) and return its path; an existing one of the
    same settings is kept. Written into a temporary sibling and renamed, so a cut run leaves no half cache."""
    out = Path(out)
    copies = copies or default_copies(size)
    want = dict(count=num_images, height=size, seed=seed, copies=copies, shapes_version=SHAPES_VERSION)
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return out
        raise FileExistsError(f"{out} holds another shapes set ({ {k: meta.get(k) for k in want} }); delete it or "
                              f"choose another folder")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    images = np.empty((num_images, size, size), np.uint8)
    labels = []
    for i in range(num_images):
        images[i], y = shapes_sample(i, size, seed, copies)
        labels.append(CLASSES[y])
    np.save(tmp / "images.npy", images)
    split = np.random.default_rng([seed, 1]).choice(["train", "val", "test"], num_images, p=[0.6, 0.05, 0.35])
    with open(tmp / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["i", "name", "patient", "split", "labels"])
        for i in range(num_images):
            w.writerow([i, f"shapes_{i:05d}", f"shapes_{i:05d}", split[i], labels[i]])
    meta = dict(format="adam-cache-v1", dataset="shapes", channels=1, width=size, label_names=list(CLASSES),
                structures=[], landmark_names=[], source=f"known-answer shapes, seed {seed}", **want)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    return out
