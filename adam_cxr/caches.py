"""The dataset cache: what every data_prep.py command writes and every script reads.

One folder, format "adam-cache-v1" (docs/data.md has the full table):
    meta.json      format, dataset, count N, height H, width W, channels, label_names, structures, landmark_names
    images.npy     uint8 (N, H, W) grey or (N, H, W, 3) RGB; np.load(mmap_mode="r"): __getitem__ decodes nothing
    index.csv      i,name,patient,split,labels[,extras]  (labels joined by "|"; split in train/val/test)
    masks.npy      optional uint8 (N, S, H, W) 0/1 in `structures` order (phantom, jsrt)
    landmarks.npy  optional float32 (N, L, 2) (x, y) pixels (phantom)
    report.json    what was found, expected, missing, skipped, and the source sizes and modes

Reading: open_cache checks every file against meta.json and names the one that disagrees. Writing: the builders
(adam_cxr/phantom.py, adam_cxr/convert.py) fill a temporary folder (adam_cxr/safe_files.py) with write_index and
the arrays, and publish() writes meta.json last. measure_read_speed: what the cache saves over decoding PNGs.
"""
import csv
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from adam_cxr.decode import read_image
from adam_cxr.safe_files import finish_tmp

FORMAT = "adam-cache-v1"
STRUCTURES = ["heart", "left_clavicle", "right_clavicle", "left_lung", "right_lung"]   # SCR's, and the phantom's
# chestxray14: 1024, the originals' side, from which the authors cut their parts (README "Resolution")
DEFAULT_SIZE = {"phantom": 256, "chestxray14": 1024, "eyepacs": 512, "jsrt": 512, "folder": 512, "csv": 512}
# Test hook: SIGKILL ourselves after this many images have been written (simulates a killed run).
KILL_AFTER_ENV = "ADAM_DATA_PREP_KILL_AFTER"


class DataError(Exception):
    """Bad input data: the message names the file and, where there is one, the fix."""


# ----------------------------------------------------------------------------------------------------
# Reading a cache

class Cache:
    """An opened cache. images / masks are read-only memory maps: slicing one row reads H*W bytes."""

    def __init__(self, root, meta, images, index, masks, landmarks):
        self.root, self.meta, self.images, self.index = root, meta, images, index
        self.masks, self.landmarks = masks, landmarks

    def rows(self, split):
        return [r["i"] for r in self.index if r["split"] == split]

    def label_matrix(self):
        """N x C float32 multi-hot targets in meta["label_names"] order (row i = images[i])."""
        names = {n: c for c, n in enumerate(self.meta["label_names"])}
        y = np.zeros((len(self.index), len(names)), np.float32)
        for r in self.index:
            y[r["i"], [names[l] for l in r["labels"]]] = 1
        return y

    def __len__(self):
        return len(self.index)

    def __repr__(self):
        return f"Cache({self.root}, {self.meta['dataset']}, images={tuple(self.images.shape)})"


def prepare_command(root):
    """The command that prepares the cache at `root` (used in error messages)."""
    root = Path(root)
    ds = root.name if root.name in DEFAULT_SIZE else "<dataset>"
    if ds == "phantom":
        return f"python data_prep.py phantom --out {root}"
    return f"python data_prep.py {ds} --src <downloaded {ds} folder> --out {root}"


def open_cache(root):
    """Open a prepared cache. FileNotFoundError (naming the path and the command that prepares it) if it is
    missing or unfinished; ValueError naming the file if it is malformed."""
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        what = "does not exist" if not root.exists() else "has no meta.json (not a finished cache)"
        raise FileNotFoundError(f"dataset cache {root} {what}; prepare it with: {prepare_command(root)}")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    keys = ["format", "dataset", "count", "height", "width", "channels", "label_names", "structures",
            "landmark_names"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or any(k not in meta for k in keys):
        raise ValueError(f"{meta_path}: not an {FORMAT} meta.json (needs keys {keys})")
    n, h, w, c = meta["count"], meta["height"], meta["width"], meta["channels"]
    shape = (n, h, w) if c == 1 else (n, h, w, c)

    def load(name, want_shape, want_dtype):
        path = root / name
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot be read as .npy ({e})") from None
        if tuple(a.shape) != tuple(want_shape) or a.dtype != want_dtype:
            raise ValueError(f"{path}: shape {tuple(a.shape)} {a.dtype}, meta.json says {tuple(want_shape)} "
                             f"{np.dtype(want_dtype)}")
        return a

    images = load("images.npy", shape, np.uint8)
    masks = load("masks.npy", (n, len(meta["structures"]), h, w), np.uint8) if meta["structures"] else None
    landmarks = None
    if meta["landmark_names"]:
        landmarks = np.asarray(load("landmarks.npy", (n, len(meta["landmark_names"]), 2), np.float32))
    index_path = root / "index.csv"
    try:
        with open(index_path, newline="") as f:
            rd = csv.DictReader(f)
            if rd.fieldnames is None or rd.fieldnames[:5] != ["i", "name", "patient", "split", "labels"]:
                raise ValueError(f"header {rd.fieldnames} should start with i,name,patient,split,labels")
            index = []
            for r in rd:
                r["i"] = int(r["i"])
                r["labels"] = r["labels"].split("|") if r["labels"] else []
                if r["split"] not in ("train", "val", "test") or not 0 <= r["i"] < n:
                    raise ValueError(f"bad row {r}")
                index.append(r)
    except (OSError, ValueError) as e:
        raise ValueError(f"{index_path}: {e}") from None
    if sorted(r["i"] for r in index) != list(range(n)):
        raise ValueError(f"{index_path}: column i must number the {n} rows of images.npy once each "
                         f"(found {len(index)} rows)")
    return Cache(root, meta, images, index, masks, landmarks)


# ----------------------------------------------------------------------------------------------------
# Writing a cache (into a temporary folder of adam_cxr.safe_files)

def write_index(path, rows, extra_cols=()):
    """index.csv: one row per image, in images.npy order."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["i", "name", "patient", "split", "labels", *extra_cols])
        for r in rows:
            w.writerow([r["i"], r["name"], r["patient"], r["split"], "|".join(r["labels"]),
                        *[r.get(c, "") for c in extra_cols]])


def progress(total, label):
    """The progress bar of a conversion (tqdm on stderr: count, rate, ETA)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def worker_pool(workers, init=None, args=()):
    """The writer's pool of decoding processes (fork). Its workers ignore SIGINT and die by SIGTERM: Ctrl-C reaches
    the whole process group, and the writer alone stops the conversion (pool.terminate) and removes its temporary
    folder, with one line instead of a traceback from every worker."""
    return mp.get_context("fork").Pool(workers, _worker_signals, (init, args))


def _worker_signals(init, args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if init:
        init(*args)


def kill_point(done):
    """The test hook of KILL_AFTER_ENV: SIGKILL this process once `done` images are written."""
    k = os.environ.get(KILL_AFTER_ENV)
    if k and done >= int(k):
        os.kill(os.getpid(), signal.SIGKILL)


def publish(tmp, out, meta, force=False):
    """Stamp meta.json with the format and the time, write it last and rename the temporary folder onto `out`."""
    meta = dict(meta, format=FORMAT, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return finish_tmp(tmp, out, meta, force)


# ----------------------------------------------------------------------------------------------------
# Read speed: what the cache saves over decoding PNGs (the input pipeline itself: `python bench.py pipeline`)

def measure_read_speed(root, n=200, png_side=1024, seed=0):
    """Images/s, on one core, of (a) fetching random rows of the cache's memmap into RAM, (b) decoding the same
    images as PNG at the cache's size, (c) decoding them as png_side x png_side PNGs (what the authors' loader
    does with ChestX-ray14's 1024 px files). PNGs are encoded in memory with PIL's default compression,
    so (b)/(c) exclude disk reads: they are upper bounds of a PNG loader's speed."""
    c = open_cache(root)
    rows = np.random.default_rng(seed).choice(len(c), size=min(n, len(c)), replace=False)
    t = time.perf_counter()
    for i in rows:
        np.array(c.images[i])
    memmap_rate = len(rows) / (time.perf_counter() - t)
    rates = {"memmap_rows_per_s": memmap_rate}
    for key, side in (("png_cache_size_per_s", None), (f"png_{png_side}px_per_s", png_side)):
        blobs = []
        for i in rows[: max(20, len(rows) // 4)]:
            im = Image.fromarray(np.array(c.images[i]))
            if side:
                im = im.resize((side, side), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, "PNG")
            blobs.append(buf.getvalue())
        t = time.perf_counter()
        for b in blobs:
            np.asarray(read_image(b)[0])
        rates[key] = len(blobs) / (time.perf_counter() - t)
    return dict(cache=str(root), shape=list(c.images.shape), **{k: round(v, 1) for k, v in rates.items()})
