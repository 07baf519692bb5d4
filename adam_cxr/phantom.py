"""Phantom chest radiographs: a procedural data set with exact masks, landmarks and findings, so that everything
runs without a download (`python data_prep.py phantom`, or generated on first use by open_dataset).

Geometry lives in canonical coordinates (u, v) in [-1, 1]^2: u to the image's right (= the patient's
left in a PA view), v downwards. Each image draws its own anatomy parameters, then one similarity
transform (rotation, scale, shift) maps canonical points to pixels; polygons are rasterised with PIL and
combined in numpy as attenuation (bright = dense: bone, heart, soft tissue; dark = air: lungs, trachea).
Masks are the same polygons, landmarks the same points, so the ground truth is exact by construction.
What makes it hard on purpose (version 2): pose and size vary more than a positioned PA film (where the heart
usually is, a predictor that ignores the image, scores Dice 67 on it instead of 82 in version 1); the heart is a
lobulated ellipse of varying size whose lateral border is partly lost against the aerated lung behind it;
breast shadows, scapulae and ECG leads overlap the lungs, the heart and the clavicles; the clavicles vary in
course, width and contrast (some barely brighter than the ribs); low-frequency texture, a heel-effect ramp
and stronger noise. A segmenter trained on 3 images cannot rely on where the heart is or how bright it is.
"""
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from adam_cxr.caches import STRUCTURES, kill_point, progress, publish, worker_pool, write_index
from adam_cxr.safe_files import abort_tmp, reserve, start_tmp

PHANTOM_LABELS = ["nodule", "effusion", "cardiomegaly"]
# 2: wider pose, shape and contrast variation, overlapping soft tissue, devices, lung texture, low-contrast
# clavicles (version 1's few-shot tasks were too easy to show what pretraining buys: README, "Phantom")
PHANTOM_VERSION = 2
LANDMARKS = ["trachea_top", "carina", "left_apex", "right_apex", "left_costophrenic",
             "right_costophrenic", "left_hemidiaphragm", "right_hemidiaphragm", "heart_apex", "aortic_knob"]


def _bezier(p, n=24):
    """Points on the Bezier curve with control points p (k x 2), n samples including both ends."""
    t = np.linspace(0, 1, n)[:, None]
    k = len(p) - 1
    return sum(math.comb(k, j) * t ** j * (1 - t) ** (k - j) * p[j] for j in range(k + 1))


def _ellipse(c, a, b, angle, n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ca, sa = math.cos(angle), math.sin(angle)
    x, y = a * np.cos(t), b * np.sin(t)
    return np.stack([c[0] + ca * x - sa * y, c[1] + sa * x + ca * y], 1)


def phantom_sample(i, size=256, seed=0):
    """Image i of the phantom with seed `seed`: (image H x W uint8, masks S x H x W uint8 in STRUCTURES order,
    landmarks L x 2 float32 (x, y) pixels in LANDMARKS order, labels list). Deterministic in (seed, i) only,
    so any worker can make any image."""
    rng = np.random.default_rng([seed, i])
    U = lambda lo, hi: float(rng.uniform(lo, hi))
    labels = [name for name, p in zip(PHANTOM_LABELS, (0.2, 0.15, 0.15)) if rng.random() < p]

    # canonical -> pixel similarity transform: per-image pose (rotation, size, position)
    rot, scale = math.radians(U(-12, 12)), U(0.65, 1.05)
    shift = np.array([U(-0.16, 0.16), U(-0.12, 0.16)])
    R = scale * np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    px = lambda p: ((np.asarray(p, float).reshape(-1, 2) @ R.T + shift) + 1) * size / 2 - 0.5
    unit = size / 2 * scale                                  # pixels per canonical unit (for widths)

    def poly(*shapes, width=None):                           # rasterise polygons (or thick polylines) to 0/1
        im = Image.new("L", (size, size), 0)
        d = ImageDraw.Draw(im)
        for p in shapes:
            pts = px(p).ravel().tolist()              # flat [x0, y0, x1, y1, ...]
            if width is None:
                d.polygon(pts, fill=1)
            else:
                d.line(pts, fill=1, width=max(1, int(round(width * unit))), joint="curve")
        return np.asarray(im, np.float32)

    # per-patient anatomy parameters
    W = U(0.74, 0.86)                                        # half thorax width
    v_apex = U(-0.80, -0.68)
    v_dome = {+1: U(0.30, 0.44)}                             # left (image right) hemidiaphragm
    v_dome[-1] = v_dome[+1] - U(0.02, 0.08)                  # the right dome sits higher (liver)
    u_med = U(0.08, 0.12)
    lung_pts, lm = {}, {}
    for s in (-1, +1):                                       # s = -1: patient's right lung (image left)
        u_lat = W - U(0.05, 0.09)
        apex = np.array([s * U(0.30, 0.38), v_apex + U(-0.02, 0.02)])
        cp = np.array([s * u_lat, v_dome[s] + U(0.12, 0.2)])
        mb = np.array([s * u_med, v_dome[s] + U(0.0, 0.05)])
        dome_u = s * (u_med + U(0.62, 0.75) * (u_lat - u_med))  # dome top lateral to the heart apex
        lateral = _bezier(np.array([apex, [s * (u_lat - 0.05), apex[1] - 0.02],
                                    [s * (u_lat + 0.07), cp[1] - 0.45], cp]))
        ctrl_v = 2 * v_dome[s] - 0.5 * (cp[1] + mb[1])       # quadratic whose middle reaches the dome top
        diaphragm = _bezier(np.array([cp, [dome_u, ctrl_v], mb]), 25)   # its middle point (t = 0.5) is the dome
        medial = _bezier(np.array([mb, [s * u_med, -0.1], [s * (u_med + 0.02), v_apex + 0.15], apex]))
        outline = np.concatenate([lateral, diaphragm[1:], medial[1:-1]])
        lung_pts[s] = outline
        side = "left" if s > 0 else "right"
        lm[f"{side}_apex"] = outline[np.argmin(outline[:, 1])]
        lm[f"{side}_costophrenic"] = cp
        lm[f"{side}_hemidiaphragm"] = diaphragm[12]

    # heart: tilted ellipse resting on the left dome, shifted to the patient's left; cardiomegaly enlarges it
    big = 1.4 if "cardiomegaly" in labels else 1.0
    ha, hb = U(0.27, 0.37) * big, U(0.19, 0.27) * big
    tilt = math.radians(U(10, 35))                            # long axis points down to the image right
    hc = np.array([U(0.0, 0.10) + 0.1 * (big - 1), v_dome[+1] - hb * 0.7])
    heart = _ellipse(hc, ha, hb, tilt, n=64)
    ang = np.linspace(0, 2 * np.pi, 64, endpoint=False)       # lobulated outline: radial harmonics 2-4
    bulge = 1 + sum(U(0, 0.07) * np.cos(h * ang + U(0, 2 * np.pi)) for h in (2, 3, 4))
    heart = hc + (heart - hc) * bulge[:, None]
    lm["heart_apex"] = heart[0]                              # the end of the long axis, lobulated
    knob_c, knob_r = np.array([U(0.09, 0.14), U(-0.42, -0.34)]), U(0.05, 0.07)
    lm["aortic_knob"] = knob_c + [knob_r, 0]
    carina = np.array([U(-0.02, 0.02), U(-0.36, -0.26)])
    lm["carina"], lm["trachea_top"] = carina, np.array([carina[0] + U(-0.03, 0.03), -1.0])

    # rasterise
    half = [[0.2, -1.1], [0.22, -0.97], [0.45, -0.93], [W + 0.04, -0.9], [W + 0.13, -0.74],
            [W + 0.16, -0.3], [W + 0.15, 0.3], [W + 0.1, 1.1]]                  # neck, shoulder, chest wall
    body = poly([[-x, y] for x, y in half] + [[x, y] for x, y in half[::-1]])
    m_heart = poly(heart)
    lung_outline = {s: poly(lung_pts[s]) for s in (-1, 1)}
    m_lung = {s: lung_outline[s] * (1 - m_heart) for s in (-1, 1)}   # the lung field excludes the heart
    m_clav = {}
    for s in (-1, 1):
        a, b = np.array([s * U(0.05, 0.10), U(-0.72, -0.58)]), np.array([s * (W - U(-0.02, 0.10)), U(-0.90, -0.72)])
        mid, bend = (a + b) / 2, U(0.02, 0.08)
        m_clav[s] = poly(_bezier(np.array([a, mid + [0, bend], mid - [0, bend], b])), width=U(0.035, 0.06))
    lungs = m_lung[-1] + m_lung[1]

    # canonical coordinate grid (for effusion meniscus, spine texture, density gradients)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    Ri = np.linalg.inv(R).astype(np.float32)
    px_, py_ = (xx + 0.5) * (2 / size) - (1 + float(shift[0])), (yy + 0.5) * (2 / size) - (1 + float(shift[1]))
    u, v = Ri[0, 0] * px_ + Ri[0, 1] * py_, Ri[1, 0] * px_ + Ri[1, 1] * py_

    img = 0.04 + 0.52 * body                                             # air outside, soft tissue inside
    img += 0.10 * body * np.clip(v - 0.2, 0, 1)                          # abdomen is denser
    img -= lungs * (0.40 - 0.12 * np.clip((v - v_apex) / 1.4, 0, 1))     # aerated lungs, denser at the base
    img += 0.06 * m_heart
    img -= U(0.0, 0.22) * m_heart * (lung_outline[-1] + lung_outline[1])   # aerated lung behind the heart
    spine = (np.abs(u) < 0.065).astype(np.float32) * body * (1 - 0.5 * m_heart)   # fainter behind the heart
    img += spine * (0.16 - 0.06 * (np.cos(2 * np.pi * v / 0.095) > 0.8))  # vertebrae and disc spaces
    gas = _ellipse([U(0.3, 0.5), v_dome[+1] + U(0.12, 0.18)], U(0.08, 0.14), U(0.05, 0.08), U(-0.3, 0.3))
    img -= 0.12 * poly(gas)                                   # stomach bubble under the left dome
    posterior, anterior = [], []
    t = np.linspace(0, 1, 12)
    for s in (-1, 1):
        v0 = v_apex - 0.04 + np.cumsum(rng.uniform(0.1, 0.115, 10)) - 0.1
        for k in range(10):
            posterior.append(np.stack([s * (0.06 + t * (W - 0.02)),
                                       v0[k] - 0.09 * np.sin(np.pi * t * 0.8) + 0.2 * t ** 2], 1))
            anterior.append(np.stack([s * (W - 0.02 - t * (W - 0.2)), v0[k] + 0.16 + 0.18 * t - 0.08 * t ** 2], 1))
    ribs = poly(*posterior, width=U(0.026, 0.034)) + 0.45 * poly(*anterior, width=0.024)
    img += 0.10 * np.minimum(ribs, 1.6) * body
    img += U(0.05, 0.16) * (m_clav[-1] + m_clav[1])           # some clavicles barely brighter than a rib
    for s in (-1, 1):                                         # scapula: its medial border over the upper lung
        top = np.array([s * (W - U(0.02, 0.1)), U(-0.72, -0.62)])
        img += U(0.03, 0.08) * poly([top, top + [s * 0.2, 0], [s * (W + 0.1), U(0.0, 0.15)],
                                     [s * (W - U(0.12, 0.25)), U(-0.2, 0.0)]]) * body
    if rng.random() < 0.6:                                    # breast shadows over the lower lungs
        hw, hh, dv = U(0.25, 0.4), U(0.18, 0.3), U(0.1, 0.35)
        img += U(0.04, 0.12) * poly(*[_ellipse([s * U(0.35, 0.55), dv], hw, hh, s * U(0, 0.4)) for s in (-1, 1)]) * body
    if rng.random() < 0.4:                                    # ECG leads: thin bright wires and electrode discs
        wires = [_bezier(rng.uniform([-0.9, -0.9], [0.9, 0.9], (4, 2)), 16) for _ in range(int(rng.integers(1, 4)))]
        img += U(0.10, 0.25) * np.minimum(poly(*wires, width=0.012) + poly(
            *[_ellipse(w[-1], 0.03, 0.03, 0, 12) for w in wires]), 1)
    trachea = poly([lm["trachea_top"], carina], width=0.07) + poly(
        *[[carina, carina + [s * U(0.13, 0.18), U(0.12, 0.18)]] for s in (-1, 1)], width=0.045)
    img -= 0.14 * np.minimum(trachea, 1) * (1 - lungs)
    img += 0.07 * poly(_ellipse(knob_c, knob_r, knob_r, 0, 24))
    branches = []
    for s in (-1, 1):
        hilum = np.array([s * (u_med + 0.06), U(-0.15, -0.05)])
        for _ in range(12):
            ang = U(-2.2, 2.2) if s > 0 else math.pi + U(-2.2, 2.2)
            end = hilum + U(0.2, 0.45) * np.array([math.cos(ang), math.sin(ang) * 1.3])
            mid = (hilum + end) / 2 + rng.normal(0, 0.04, 2)
            branches.append(_bezier(np.array([hilum, mid, end]), 8))
    vessels = poly(*branches, width=0.012)
    img += 0.06 * np.minimum(vessels, 1.5) * lungs
    if "nodule" in labels:
        yx = np.argwhere(lungs > 0)
        y0, x0 = yx[rng.integers(len(yx))]
        r = U(0.025, 0.05) * unit
        img += 0.2 * (((xx - x0) ** 2 + (yy - y0) ** 2) < r * r) * lungs
    if "effusion" in labels:                                 # fluid in one costophrenic recess, meniscus up laterally
        s = int(rng.choice([-1, 1]))
        level = v_dome[s] - U(0.05, 0.25)
        meniscus = level - 0.25 * np.clip(s * u - u_med, 0, None) ** 2 / W
        img += 0.30 * m_lung[s] * (v > meniscus)

    # per-image appearance: low-frequency texture, heel-effect ramp, contrast, gamma, blur, noise
    field = Image.fromarray(rng.normal(0, 1, (8, 8)).astype(np.float32)).resize((size, size), Image.BICUBIC)
    img += U(0.01, 0.05) * np.asarray(field, np.float32) * body
    img *= 1 + U(-0.15, 0.15) * (xx / size - 0.5) + U(-0.1, 0.1) * (yy / size - 0.5)
    img = np.clip(img * U(0.8, 1.2) + U(-0.06, 0.06), 0, 1) ** U(0.7, 1.4)
    im = Image.fromarray((img * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(U(0.3, 1.6) * size / 256))
    img = np.asarray(im, np.float32) + rng.normal(0, U(2.0, 9.0), (size, size))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    masks = np.stack([m_heart, m_clav[1], m_clav[-1], m_lung[1], m_lung[-1]]).astype(np.uint8)
    landmarks = px(np.stack([lm[n] for n in LANDMARKS])).astype(np.float32)
    landmarks = np.clip(landmarks, 0, size - 1)                # trachea_top sits on the top edge
    return image, masks, landmarks, labels


def _phantom_job(args):
    i, size, seed, png = args
    out = phantom_sample(i, size, seed)
    Image.fromarray(out[0]).save(png, compress_level=1)     # in the worker: PNG encoding is a third of the cost
    return i, out


def phantom_splits(num_images, seed):
    """70/10/20 train/val/test by a seeded permutation."""
    perm = np.random.default_rng([seed, 10 ** 6]).permutation(num_images)
    split = np.empty(num_images, object)
    n_tr, n_va = int(round(0.7 * num_images)), int(round(0.1 * num_images))
    split[perm[:n_tr]], split[perm[n_tr:n_tr + n_va]], split[perm[n_tr + n_va:]] = "train", "val", "test"
    return split


def build_phantom(out, num_images=1000, size=256, seed=0, workers=1, force=False, quiet=False, wait=False):
    out = Path(out)
    n, S, L = num_images, len(STRUCTURES), len(LANDMARKS)
    tmp = start_tmp(out, force, need=n * size * size * (S + 2), wait=wait)  # images, masks, PNGs (at most 1 B/px)
    try:
        (tmp / "png").mkdir()
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, size, size))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, S, size, size))
        reserve(tmp / "images.npy")
        reserve(tmp / "masks.npy")
        landmarks = np.zeros((n, L, 2), np.float32)
        labels = [None] * n
        names = [f"phantom_{i:05d}" for i in range(n)]
        jobs = [(i, size, seed, tmp / "png" / f"{names[i]}.png") for i in range(n)]
        pool = worker_pool(workers) if workers > 1 else None
        results = pool.imap_unordered(_phantom_job, jobs, chunksize=8) if pool else map(_phantom_job, jobs)
        prog = None if quiet else progress(n, "phantom")
        try:
            for done, (i, (img, m, lmk, lab)) in enumerate(results, 1):
                images[i], masks[i], landmarks[i], labels[i] = img, m, lmk, lab
                if prog:
                    prog.update()
                kill_point(done)
        finally:
            if pool:
                pool.terminate()
            if prog:
                prog.close()                         # here: an error's line then follows the bar's last one
        images.flush(), masks.flush()
        del images, masks
        np.save(tmp / "landmarks.npy", landmarks)
        split = phantom_splits(n, seed)
        rows = [dict(i=i, name=names[i], patient=names[i], split=split[i], labels=labels[i]) for i in range(n)]
        write_index(tmp / "index.csv", rows)
        with open(tmp / "landmarks.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name"] + [f"{l}_{c}" for l in LANDMARKS for c in "xy"])
            for i in range(n):
                w.writerow([names[i]] + [f"{x:.2f}" for x in landmarks[i].ravel()])
        with open(tmp / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["name"] + PHANTOM_LABELS)
            for i in range(n):
                w.writerow([names[i]] + [int(l in labels[i]) for l in PHANTOM_LABELS])
        for sp in ("train", "val", "test"):
            (tmp / f"{sp}_list.txt").write_text("".join(f"{names[i]}\n" for i in range(n) if split[i] == sp))
        meta = dict(dataset="phantom", count=n, height=size, width=size, channels=1, label_names=PHANTOM_LABELS,
                    structures=STRUCTURES, landmark_names=LANDMARKS, source=f"procedural phantom, seed {seed}",
                    seed=seed, phantom_version=PHANTOM_VERSION)
        return publish(tmp, out, meta, force)
    except BaseException as e:
        abort_tmp(tmp, out, e)
        raise


def ensure_phantom(root, num_images=1000, size=256, seed=0, workers=None):
    """Generate the phantom cache at root unless root/meta.json exists; return root. Safe when several
    processes (e.g. torchrun ranks) call it at once: one builds it, the others wait for its lock and use it."""
    root = Path(root)
    if (root / "meta.json").exists():
        try:
            meta = json.loads((root / "meta.json").read_text())
            want = dict(count=num_images, height=size, seed=seed, phantom_version=PHANTOM_VERSION)
            diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        except ValueError:
            diff = {}                                  # open_cache will name the broken file
        if diff:                                       # the contract: an existing cache is returned as is
            print(f"warning: using the existing phantom at {root}, which differs from the request "
                  f"{ {k: f'{a} != {b}' for k, (a, b) in diff.items()} }; delete it to regenerate", file=sys.stderr)
        return root
    try:
        if workers is None:                           # a pool only pays off for bigger sets
            workers = 1 if num_images < 200 else min(2, os.cpu_count() or 1)
        build_phantom(root, num_images, size, seed, workers=workers, quiet=True, wait=True)
    except (FileExistsError, OSError):
        if not (root / "meta.json").exists():       # a concurrent process did not win either: a real error
            raise
    return root

