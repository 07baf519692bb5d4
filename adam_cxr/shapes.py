"""The known-answer data sets of the learning test (docs/learning.md), written as data_prep caches.

Exemplars (the test's default, `build_exemplars`): each class is one pattern of three shapes, and the train split
(what pretraining sees) holds identical copies of it, centred and at one grey level. Two train images then share
their class and nothing else, so instance discrimination can only be solved by learning the patterns, as far as the
views make them look different. The test split holds the patterns at new poses and grey levels (shift, scale,
rotation, brightness, contrast, noise: what the views randomise), never seen in pretraining; the probes fit half of
it and score the other half.

Shapes (the first design, `build_shapes`; kept to reproduce the search of docs/learning.md): each image holds copies
of ONE shape (disc, square, triangle, cross, ring, bar, L or star), each copy with its own position, size and
rotation, brighter than a flat background, with noise; grey levels vary a little between images and the copies are
as many in every image. The class is then the only thing two images share that the views keep, besides the layout of
the copies, which the crops move. A frozen linear probe (and k-NN) of the class lifts above a random init only if
pretraining learned the shapes: what docs/learning.md measures. Written as a data_prep cache (images.npy, index.csv,
meta.json, labels = the class), so adam.py trains on it with `--data <folder>`.
"""
import csv
import json
import math
import os
from pathlib import Path

import numpy as np

CLASSES = ("disc", "square", "triangle", "cross", "ring", "bar", "L", "star")
SHAPES_VERSION = 3
EXEMPLARS_VERSION = 1


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


def exemplar_parts(c, seed=0):
    """Class c's pattern: three (shape, centre u, centre v, radius, rotation) in units of the pattern's scale."""
    rng = np.random.default_rng([seed, c, 99])
    return [(CLASSES[rng.integers(len(CLASSES))], *rng.uniform(-0.6, 0.6, 2), rng.uniform(0.25, 0.45),
             rng.uniform(0, 2 * math.pi)) for _ in range(3)]


def render_exemplar(parts, size, cx, cy, scale, rotation, bg, fg, noise=0.0):
    """H x W uint8: the pattern centred at (cx, cy) px, `scale` px per pattern unit, turned by `rotation`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    x0, y0 = xx - cx, yy - cy
    xr = math.cos(rotation) * x0 + math.sin(rotation) * y0
    yr = -math.sin(rotation) * x0 + math.cos(rotation) * y0
    mask = np.zeros((size, size), bool)
    for cls, ou, ov, r, th in parts:
        du, dv = (xr - ou * scale) / (r * scale), (yr - ov * scale) / (r * scale)
        mask |= _inside(cls, math.cos(th) * du + math.sin(th) * dv, -math.sin(th) * du + math.cos(th) * dv)
    return np.clip((np.where(mask, fg, bg) + noise) * 255 + 0.5, 0, 255).astype(np.uint8)


def exemplar_samples(classes, copies, tests, size, seed=0):
    """(images N x H x W uint8, labels, splits): per class, `copies` identical canonical images (train: centred, grey
    0.3 / 0.7) and `tests` images at a new pose and grey level each (test; within the range of the views: shift up
    to 12 % of the side, scale 0.85-1.2, rotation up to 26 degrees, background 0.15-0.45, contrast 0.25-0.5, noise)."""
    images, labels, splits = [], [], []
    for c in range(classes):
        parts = exemplar_parts(c, seed)
        canonical = render_exemplar(parts, size, size / 2, size / 2, 0.4 * size, 0.0, 0.3, 0.7)
        images += [canonical] * copies
        for j in range(tests):
            rng = np.random.default_rng([seed, c, j, 1])
            bg = rng.uniform(0.15, 0.45)
            images.append(render_exemplar(parts, size, *(size / 2 + rng.uniform(-0.12, 0.12, 2) * size),
                                          0.4 * size * rng.uniform(0.85, 1.2), rng.uniform(-0.45, 0.45), bg,
                                          bg + rng.uniform(0.25, 0.5), rng.normal(0, 0.02, (size, size))))
        labels += [f"p{c:03d}"] * (copies + tests)
        splits += ["train"] * copies + ["test"] * tests
    return np.stack(images), labels, splits


def _write_cache(out, want, make):
    """The cache at `out` made by make() -> (images, labels, splits, label names, source), or the one there if its
    meta.json has the settings `want`; another set there is refused. Written into a temporary sibling and renamed,
    so a cut run leaves no half cache."""
    out = Path(out)
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return out
        raise FileExistsError(f"{out} holds another known-answer set ({ {k: meta.get(k) for k in want} }); delete it "
                              f"or choose another folder")
    images, labels, splits, names, source = make()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    np.save(tmp / "images.npy", images)
    with open(tmp / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["i", "name", "patient", "split", "labels"])
        for i, (label, split) in enumerate(zip(labels, splits)):
            w.writerow([i, f"shapes_{i:05d}", f"shapes_{i:05d}", split, label])
    meta = {**dict(format="adam-cache-v1", channels=1, width=images.shape[2], height=images.shape[1],
                   count=len(images), label_names=names, structures=[], landmark_names=[], source=source), **want}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    return out


def build_exemplars(out, classes=64, copies=8, tests=20, size=32, seed=0):
    """Write the exemplars cache at `out` (classes x copies train images, classes x tests test images) and return
    its path; an existing one of the same settings is kept."""
    want = dict(dataset="exemplars", classes=classes, copies=copies, tests=tests, height=size, seed=seed,
                exemplars_version=EXEMPLARS_VERSION)
    names = [f"p{c:03d}" for c in range(classes)]
    return _write_cache(out, want, lambda: (*exemplar_samples(classes, copies, tests, size, seed), names,
                                            f"known-answer exemplars, seed {seed}"))


def build_shapes(out, num_images=3000, size=64, seed=0, copies=None):
    """Write the shapes cache at `out` (train 60 % / val 5 % / test 35 %) and return its path; an existing one of the
    same settings is kept."""
    copies = copies or default_copies(size)
    want = dict(dataset="shapes", count=num_images, height=size, seed=seed, copies=copies,
                shapes_version=SHAPES_VERSION)

    def make():
        images = np.empty((num_images, size, size), np.uint8)
        labels = []
        for i in range(num_images):
            images[i], y = shapes_sample(i, size, seed, copies)
            labels.append(CLASSES[y])
        split = np.random.default_rng([seed, 1]).choice(["train", "val", "test"], num_images, p=[0.6, 0.05, 0.35])
        return images, labels, list(split), list(CLASSES), f"known-answer shapes, seed {seed}"
    return _write_cache(out, want, make)
