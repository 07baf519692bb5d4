"""
From datasets as people download them to a fast, verified training cache, and a procedural phantom.

    python data_prep.py phantom      [--out data/phantom] [--num-images 1000] [--size 256] [--seed 0]
    python data_prep.py chestxray14  --src DIR [--out data/chestxray14] [--size 512]
    python data_prep.py eyepacs      --src DIR [--out data/eyepacs]
    python data_prep.py jsrt         --src DIR [--masks SCR_DIR] [--out data/jsrt]
    python data_prep.py folder       --src DIR [--out data/folder] [--patient-from auto|stem|dicom|up:N|REGEX]
    python data_prep.py csv          --src DIR --csv [SPLIT=]FILE --image-col COL (--label-cols A,B | --label-col COL)
                                     [--patient-col COL | --patient-from ...] [--split-col COL] [--uncertain ...]

    python data_prep.py speed        --cache DIR      (images/s: cache rows vs PNG decoding)

Every command writes one "cache" folder, format "adam-cache-v1" (README "Data" has the full table):
    meta.json      format, dataset, count N, height H, width W, channels, label_names, structures, landmark_names
    images.npy     uint8 (N, H, W) grey or (N, H, W, 3) RGB; np.load(mmap_mode="r"): __getitem__ decodes nothing
    index.csv      i,name,patient,split,labels[,extras]  (labels joined by "|"; split in train/val/test)
    masks.npy      optional uint8 (N, S, H, W) 0/1 in `structures` order (phantom, jsrt)
    landmarks.npy  optional float32 (N, L, 2) (x, y) pixels (phantom)
    report.json    what was found, expected, missing, skipped, and the source sizes and modes

Safety: the cache is built in a hidden temporary sibling folder and renamed into place at the end,
meta.json being the last file written inside it and every file fsynced first, so a killed run never leaves a
folder that `open_cache` accepts; a re-run starts clean and removes temporary folders of dead runs. A lock beside
--out refuses a second conversion into it; the free space is checked before anything is written and the
memory-mapped arrays are allocated up front (a full disk: one line, not a SIGBUS); any failure removes the
temporary folder. A bad source file is an error naming it (and nothing is written) unless --skip-bad is given, in
which case it is skipped and listed in report.json; repeated rows and list entries are reported and warned about.

Every script opens its --data through open_dataset (a cache by name or folder; the phantom is generated when
missing) or open_images (a split's images, or any folder of PNG/JPEG files that is not a cache), and decodes
every image with read_image.

Import cost: numpy + pillow only; pydicom is imported when a DICOM file is met, tqdm when a conversion starts.
"""
import argparse
import atexit
import csv
import errno
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tarfile
import threading
import time
import zlib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

try:
    import fcntl  # the output locks (FolderLock); absent on Windows, where there is no lock
except ImportError:
    fcntl = None

FORMAT = "adam-cache-v1"
STRUCTURES = ["heart", "left_clavicle", "right_clavicle", "left_lung", "right_lung"]
PHANTOM_LABELS = ["nodule", "effusion", "cardiomegaly"]
# 2: wider pose, shape and contrast variation, overlapping soft tissue, devices, lung texture, low-contrast
# clavicles (version 1's few-shot tasks were too easy to show what pretraining buys: README, "Phantom")
PHANTOM_VERSION = 2
LANDMARKS = ["trachea_top", "carina", "left_apex", "right_apex", "left_costophrenic",
             "right_costophrenic", "left_hemidiaphragm", "right_hemidiaphragm", "heart_apex", "aortic_knob"]
CXR14_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]
CXR14_TRAIN, CXR14_VAL = 75312, 11212          # the authors' split of train_val_list.txt (docs/METHOD.md §5)
# chestxray14: 1024, the originals' side, from which the authors cut their parts (README "Resolution")
DEFAULT_SIZE = {"phantom": 256, "chestxray14": 1024, "eyepacs": 512, "jsrt": 512, "folder": 512, "csv": 512}
# Test hook: SIGKILL ourselves after this many images have been written (simulates a killed run).
KILL_AFTER_ENV = "ADAM_DATA_PREP_KILL_AFTER"


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
# Opening a dataset by name or folder: the one way adam.py, finetune.py and eve.py find their images

DATASETS = ("phantom", "chestxray14", "eyepacs", "jsrt")  # names that mean a cache at data/<name>


class DataError(Exception):
    """Bad input data: the message names the file and, where there is one, the fix."""


def dataset_root(data, root=None):
    """--data NAME [--data-root DIR] -> DIR, else data/NAME for a named dataset; any other --data is the folder."""
    return Path(root) if root else Path(f"data/{data}") if data in DATASETS else Path(data)


def open_dataset(data, root=None, phantom_images=None):
    """The cache of a named dataset or of a cache folder. The phantom is generated when missing, with
    phantom_images images (default 1000); given, an existing phantom of another size gets a warning.
    FileNotFoundError naming the folder and the command that prepares it."""
    path = dataset_root(data, root)
    if not (path / "meta.json").exists():
        _recover(path)                                 # a --force swap cut short leaves the old cache hidden
    ready = (path / "meta.json").exists()
    if data == "phantom" and not ready:
        print(f"no phantom set at {path}: generating it", file=sys.stderr, flush=True)
    if data == "phantom" and (phantom_images or not ready):
        ensure_phantom(path, num_images=phantom_images or 1000, seed=0)
    elif data in DATASETS and not ready:
        raise FileNotFoundError(f"--data {data}: no prepared dataset at {path}; prepare it with "
                                f"`python data_prep.py {data} --src <downloaded folder> --out {path}`")
    return open_cache(path)


class CacheImages:
    """The images of one split of a cache (uint8 memory map): no decoding per sample."""

    def __init__(self, cache, split):
        self.images, self.rows, self.name = cache.images, cache.rows(split), str(cache.root)

    def __len__(self):
        return len(self.rows)

    @property
    def size(self):
        """(H, W), the same for every image of a cache."""
        return tuple(self.images.shape[1:3])

    def __getitem__(self, i):
        return self.part(i, 0, 0, *self.size)

    def part(self, i, top, left, h, w):
        """Rows top..top+h-1, columns left..left+w-1 of image i: C x h x w uint8, copied out of the memory map, which
        reads those rows only (adam.py's parts: 1/16 of an image at level 4)."""
        x = np.array(self.images[self.rows[i], top:top + h, left:left + w])
        return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


class FolderImages:
    """Any folder of PNG/JPEG images that is not a cache (plain_images), decoded on the fly by read_image (slow for
    big images: prefer a cache)."""

    def __init__(self, root):
        self.files = sorted(plain_images(root, (".png", ".jpg", ".jpeg")).values())
        if not self.files:
            raise DataError(f"--data {root}: no PNG/JPEG images in this folder")
        self.name = str(root)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return np.array(read_image(self.files[i])[0])[None]  # 1 x H x W uint8, writable
        except Exception as e:  # PIL raises many types; the user needs the file name
            raise DataError(f"cannot read image {self.files[i]}: {e}") from e


def plain_images(root, exts, flag="--data"):
    """{relative path: file} of the images under `root` (suffixes `exts`), refusing a folder that is or holds a
    cache: reading a cache's files as plain images would mix its splits, test images included. A folder is a cache
    only with a valid meta.json (open_cache); an images.npy without one is an unfinished cache, and data_prep's
    hidden temporary folders (skipped by _walk inside `root`) are refused when given themselves."""
    root = Path(root)
    m = TMP_FOLDER.fullmatch(root.name)
    if m:
        raise DataError(f"{flag} {root}: data_prep.py's temporary folder of {root.parent / m.group(1)} (a conversion "
                        f"still running, or killed); use {root.parent / m.group(1)} once data_prep.py has finished")
    found = _walk(root, tuple(exts) + ("meta.json", "images.npy"))
    for cache in sorted({p.parent for p in found.values() if p.name in ("meta.json", "images.npy")}):
        if (cache / "meta.json").is_file():
            raise DataError(f"{flag} {root}: {cache} inside it is a data_prep.py cache; pass {flag} {cache} to use it "
                            f"as one (its splits kept apart), or move it out of {root}")
        raise DataError(f"{flag} {root}: {cache} is an unfinished data_prep.py cache (images.npy but no meta.json: its "
                        f"conversion was killed or is still running); run data_prep.py again to finish it")
    return {rel: p for rel, p in found.items() if p.name not in ("meta.json", "images.npy")}


def open_images(data, root=None, split="train", phantom_images=None):
    """--data [--data-root] -> the images of `split` as an indexable set of C x H x W uint8 arrays with a
    .name, or None when the split is empty (a plain folder of images is all "train")."""
    path = dataset_root(data, root)
    if not (path / "meta.json").exists():
        _recover(path)                                 # a --force swap cut short leaves the old cache hidden
    if data in DATASETS or (path / "meta.json").exists():
        cache = open_dataset(data, root, phantom_images)
        return CacheImages(cache, split) if cache.rows(split) else None
    if not path.is_dir():
        raise FileNotFoundError(
            f"--data {data}: no such folder. Give a folder of PNG/JPEG images, or prepare a dataset "
            f"with `python data_prep.py chestxray14 --src <download> --out data/chestxray14`")
    return FolderImages(path) if split == "train" else None


# ----------------------------------------------------------------------------------------------------
# Writing safely: one writer per output (FolderLock), room checked before writing, fsync before every rename.
# runs.py writes the run folder with the same pieces.

class DiskFull(OSError):
    """No room for an output: the message names it and the fix (one line, no traceback, like every error a user
    can fix)."""


def _gib(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def disk_full(error, folder):
    """Did `error` come from a full disk under `folder`? ENOSPC or EDQUOT, or any error while that disk has under
    1 MiB free: torch.save reports a full disk as "enforce fail ... unexpected pos", not as an OSError."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < 2 ** 20
    except OSError:
        return False


def check_room(folder, need, what, fix):
    """DiskFull, before anything is written, when `folder`'s disk has less than `need` bytes (+5 %) free."""
    free = shutil.disk_usage(folder).free
    if free < need * 1.05:
        raise DiskFull(f"disk full: {what} needs about {_gib(need)} and {folder} has {_gib(free)} free; {fix}")


def reserve(path):
    """Allocate a file's blocks now (posix_fallocate): a write through a memory map to a full disk would kill the
    process with SIGBUS, with no message and no clean-up. ENOSPC is raised here instead."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no fallocate here: go on
                    raise


def fsync(path):
    """Flush a file (or a folder's entries) to the disk, so that a rename after it never publishes an empty or
    partial file after a crash or power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):                  # some file systems cannot sync folders: nothing to do
            raise
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive lock on an output (a run folder, a cache being written), held by this process until release()
    or its end: a POSIX record lock (fcntl.lockf) on the lock file `path`, so a second process is refused at once
    (or waits, wait=True), a killed process never leaves a stale lock, and forked DataLoader workers hold nothing.
    `busy` is the refusal, with {pid} for the holder. The lock file is removed on release."""

    def __init__(self, path, busy, wait=False):
        self.path, self.fd = Path(path), None
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise BlockingIOError(busy.format(pid=holder)) from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):   # a file system without locks
                    return
                raise
            try:                                     # the file we locked may have been removed by its last holder
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        atexit.register(self.release)                # a run stopped by an error leaves no lock file either

    def release(self):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
            atexit.unregister(self.release)


# ----------------------------------------------------------------------------------------------------
# Writing a cache atomically

TMP_FOLDER = re.compile(r"\.(.+)\.(tmp|old)-(\d+)")   # data_prep's hidden siblings of a cache being written
_LOCKS = {}                                               # temporary folder -> the lock on its output


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(out):
    """Clear what dead runs left beside `out`: their temporary folders are deleted; the old cache of a --force
    swap cut between its two renames (.<name>.old-<pid>, and no `out`) is put back."""
    for old in sorted(Path(out).parent.glob(f".{Path(out).name}.*-*")):
        m = TMP_FOLDER.fullmatch(old.name)
        if not m or m.group(1) != Path(out).name or _pid_alive(int(m.group(3))):
            continue
        if m.group(2) == "old" and not Path(out).exists() and (old / "meta.json").is_file():
            os.rename(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _start_tmp(out, force=False, need=0, wait=False):
    """Lock `out` (another process writing it: refused, or waited for with wait=True), check that `need` bytes fit
    on its disk, clear what dead runs left, and return a fresh temporary sibling folder to build the cache in."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out.parent / f".{out.name}.lock", f"{out} is being written by another data_prep.py (pid "
                      f"{{pid}}): wait for it to end, or pick another --out", wait)
    try:
        _recover(out)
        if out.exists() and not (out / "meta.json").exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists, is not empty and is not a cache (no meta.json)"
                                  f"{': --force replaces caches only' if force else ''}; move it away or pick --out")
        if (out / "meta.json").exists() and not force:
            raise FileExistsError(f"{out} already holds a cache; pass --force to rebuild it")
        check_room(out.parent, need, f"writing {out}", "free space, or pick another --out or a smaller --size")
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except BaseException:
        lock.release()
        raise
    _LOCKS[tmp] = lock
    return tmp


def _finish_tmp(tmp, out, meta, force=False):
    """Write meta.json last (itself via temp + rename), fsync every file, then rename the folder into place and
    release the lock. A --force rebuild swaps: the old cache waits in .<name>.old-<pid> until the new one is in
    place (a kill in between: _recover puts it back), then is deleted."""
    meta = dict(meta, format=FORMAT, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    (tmp / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    for f in [*tmp.rglob("*"), tmp]:
        fsync(f)
    os.replace(tmp / "meta.json.tmp", tmp / "meta.json")
    fsync(tmp)
    out = Path(out)
    if (out / "meta.json").exists() and not force:             # a concurrent run finished first: keep its cache
        raise FileExistsError(f"{out} was completed by another process meanwhile; pass --force to replace it")
    if (out / "meta.json").exists():                             # --force: swap, then delete the old cache
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()                                         # empty placeholder folder
        os.rename(tmp, out)
    fsync(out.parent)
    _LOCKS.pop(tmp).release()
    return out


def _abort_tmp(tmp, out, error):
    """A build failed: delete its temporary folder and release the lock; a full disk becomes one clear DiskFull."""
    full = isinstance(error, Exception) and not isinstance(error, DiskFull) and disk_full(error, tmp.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    lock = _LOCKS.pop(tmp, None)
    if lock:
        lock.release()
    if full:
        raise DiskFull(f"disk full while writing {out}: nothing was written; free space, or pick another --out or "
                       f"a smaller --size") from None


def _write_index(path, rows, extra_cols=()):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["i", "name", "patient", "split", "labels", *extra_cols])
        for r in rows:
            w.writerow([r["i"], r["name"], r["patient"], r["split"], "|".join(r["labels"]),
                        *[r.get(c, "") for c in extra_cols]])


def _progress(total, label):
    """The progress bar of a conversion (tqdm on stderr: count, rate, ETA)."""
    from tqdm import tqdm
    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


def _maybe_die(done):
    k = os.environ.get(KILL_AFTER_ENV)
    if k and done >= int(k):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------
# Phantom chest radiographs
#
# Geometry lives in canonical coordinates (u, v) in [-1, 1]^2: u to the image's right (= the patient's
# left in a PA view), v downwards. Each image draws its own anatomy parameters, then one similarity
# transform (rotation, scale, shift) maps canonical points to pixels; polygons are rasterised with PIL and
# combined in numpy as attenuation (bright = dense: bone, heart, soft tissue; dark = air: lungs, trachea).
# Masks are the same polygons, landmarks the same points, so the ground truth is exact by construction.
# What makes it hard on purpose (version 2): pose and size vary more than a positioned PA film (where the heart
# usually is, a predictor that ignores the image, scores Dice 67 on it instead of 82 in version 1); the heart is a
# lobulated ellipse of varying size whose lateral border is partly lost against the aerated lung behind it;
# breast shadows, scapulae and ECG leads overlap the lungs, the heart and the clavicles; the clavicles vary in
# course, width and contrast (some barely brighter than the ribs); low-frequency texture, a heel-effect ramp
# and stronger noise. A segmenter trained on 3 images cannot rely on where the heart is or how bright it is.

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
    tmp = _start_tmp(out, force, need=n * size * size * (S + 2), wait=wait)  # images, masks, PNGs (at most 1 B/px)
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
        pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
        results = pool.imap_unordered(_phantom_job, jobs, chunksize=8) if pool else map(_phantom_job, jobs)
        prog = None if quiet else _progress(n, "phantom")
        try:
            for done, (i, (img, m, lmk, lab)) in enumerate(results, 1):
                images[i], masks[i], landmarks[i], labels[i] = img, m, lmk, lab
                if prog:
                    prog.update()
                _maybe_die(done)
        finally:
            if pool:
                pool.terminate()
        if prog:
            prog.close()
        images.flush(), masks.flush()
        del images, masks
        np.save(tmp / "landmarks.npy", landmarks)
        split = phantom_splits(n, seed)
        rows = [dict(i=i, name=names[i], patient=names[i], split=split[i], labels=labels[i]) for i in range(n)]
        _write_index(tmp / "index.csv", rows)
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
        return _finish_tmp(tmp, out, meta, force)
    except BaseException as e:
        _abort_tmp(tmp, out, e)
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


# ----------------------------------------------------------------------------------------------------
# Decoding one image: read_image, the one reader of every script (data_prep's converters, adam.py's folder source,
# eve.py). Documented pixel recipe (tests recompute it with PIL the same way):
#   orientation: an EXIF Orientation tag (phone photos, some scanners) is applied (ImageOps.exif_transpose).
#   grey:  PIL Image.convert("L")  (ITU-R 601-2 luma, alpha ignored: a grey image stored as RGBA with
#          R=G=B keeps its values); 16-bit PNGs ("I;16", "I") and float images are min-max scaled to 0..255 first.
#   RGB:   Image.convert("RGB").  JPEGs are decoded with Image.draft(mode, (size, size)), i.e. by libjpeg's
#          DCT scaling at the smallest 1/2, 1/4, 1/8 scale still >= size (a 3888x2592 photo decodes at 1/4
#          of its side for 512 px: a fraction of the full decode's time).
#   fit:   "pad" centres the image on a black square, "crop" takes the centred square, "stretch" neither.
#   size:  Image.resize((size, size), Image.BILINEAR) (PIL filters with the full support when shrinking,
#          so this is antialiased); masks use Image.NEAREST and are then thresholded at > 0.
#   DICOM: dicom_to_grey; JSRT raw: jsrt_to_grey.

def _to_mode(im, channels):
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, np.float64)
        lo, hi = a.min(), a.max()
        im = Image.fromarray(np.rint((a - lo) * 255 / max(hi - lo, 1)).astype(np.uint8))
    return im.convert("L" if channels == 1 else "RGB")


def _fit(im, size, fit, resample=Image.BILINEAR):
    w, h = im.size
    if fit == "crop" and w != h:
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    elif fit == "pad" and w != h:
        s = max(w, h)
        canvas = Image.new(im.mode, (s, s), 0)
        canvas.paste(im, ((s - w) // 2, (s - h) // 2))
        im = canvas
    if im.size != (size, size):
        im = im.resize((size, size), resample)
    return im


def read_image(src, channels=1, size=None, fit="pad", decoder="auto", dicom_window="header",
               resample=Image.BILINEAR):
    """src (a path, or the bytes of an archive member) -> (PIL image in "L" for channels 1 or "RGB", {"size": "WxH",
    "mode": what the source was}) by the recipe above, fitted to size x size when size is given. decoder "auto":
    DICOM by its suffix or its DICM preamble, anything else through PIL; or "pil", "dicom", "jsrt"."""
    path = None if isinstance(src, bytes) else Path(src)
    if decoder == "auto":
        decoder = "dicom" if path is not None and _is_dicom(path) else "pil"
    if decoder == "jsrt":
        im = jsrt_to_grey(src if path is None else path.read_bytes(), str(path or "<bytes>"))
        info = {"size": f"{im.size[0]}x{im.size[1]}", "mode": "12-bit raw"}
    elif decoder == "dicom":
        im, _ = dicom_to_grey(src, dicom_window)
        info = {"size": f"{im.size[0]}x{im.size[1]}", "mode": "DICOM"}
    else:
        im = Image.open(io.BytesIO(src) if path is None else path)
        if im.format == "JPEG" and size:
            im.draft("L" if channels == 1 else "RGB", (size, size))
        im.load()                                    # raises on truncated / corrupt files
        info = {"size": f"{im.size[0]}x{im.size[1]}", "mode": im.mode}
        if im.getexif().get(0x0112, 1) != 1:         # EXIF Orientation: the stored pixels are rotated or mirrored
            im = ImageOps.exif_transpose(im)
    im = _to_mode(im, channels)
    return (_fit(im, size, fit, resample) if size else im), info


def _is_dicom(path):
    suffix = path.suffix.lower()
    if suffix in (".dcm", ".dicom"):
        return True
    if suffix in (".png", ".jpg", ".jpeg"):
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def jsrt_to_grey(raw, path="<bytes>"):
    """JSRT .IMG: headerless big-endian 12-bit square image (2048 x 2048 in the real set; the side is taken from
    the file size, so small fakes work). Stored as a negative: grey = 255 - round(v * 255 / 4095)."""
    n = len(raw) // 2
    side = math.isqrt(n)
    if side * side * 2 != len(raw) or side == 0:
        raise ValueError(f"{path}: {len(raw)} bytes is not a square 16-bit raw image (JSRT is 2048x2048x2 bytes)")
    a = np.frombuffer(raw, ">u2").reshape(side, side).astype(np.int32)
    if a.max() > 4095:
        raise ValueError(f"{path}: values up to {a.max()}, not 12-bit; is this a JSRT .IMG file?")
    return Image.fromarray((255 - (a * 255 + 2047) // 4095).astype(np.uint8))


def voi_output_range(ds):
    """(lo, hi): the range of what pydicom's apply_voi_lut returns for `ds` (DICOM PS3.3 C.11.2), the range that
    dicom_to_grey maps to 0..255. VOI LUT Sequence: 0 .. 2^n - 1 with n its LUT Descriptor's third value
    (bits per entry). Window (LINEAR, LINEAR_EXACT, SIGMOID): the modality output range, as apply_windowing
    computes it: 0 .. 2^n - 1 of a Modality LUT Sequence, else the stored range (BitsStored, signed or not)
    through RescaleSlope / RescaleIntercept."""
    if ds.get("VOILUTSequence"):
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif ds.get("PixelRepresentation", 0) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + icpt, hi * slope + icpt))
    return lo, hi


def dicom_to_grey(path, window="header"):
    """DICOM -> 8-bit grey, by the standard's pipeline as pydicom implements it (PS3.3 C.11):
    1. modality LUT: pydicom.pixels.apply_modality_lut (Modality LUT Sequence, else RescaleSlope/Intercept);
    2. VOI LUT: pydicom.pixels.apply_voi_lut with the file's first VOI (its VOI LUT Sequence, else its first
       WindowCenter/WindowWidth with VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID), whose output range
       (voi_output_range) is mapped linearly to 0..255 and rounded;
       a file that carries no VOI, or window="percentile", gets the image's own 1st..99th percentiles instead
       (also the choice for files whose header window spans the whole stored range, such as pydicom-data's
       RG1_UNCR.dcm, which its header window renders almost flat);
    3. MONOCHROME1 (bright = air) is inverted after rounding, so bone is bright as usual and the inversion exact.
    Multi-frame files: the first frame. Returns (PIL image, patient id)."""
    import pydicom                                   # lazy: only DICOM sources need it
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    if a.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        a = a[0]                                     # multi-frame: first frame
    patient = str(ds.get("PatientID", "") or "")
    if a.ndim == 3:                                  # colour DICOM
        return Image.fromarray(a.astype(np.uint8)).convert("L"), patient
    a = apply_modality_lut(a, ds)
    has_voi = bool(ds.get("VOILUTSequence")) or (ds.get("WindowCenter") is not None
                                                  and ds.get("WindowWidth") is not None)
    if window == "header" and has_voi:
        v = apply_voi_lut(a, ds, index=0).astype(np.float64)
        lo, hi = voi_output_range(ds)
    else:
        v = np.asarray(a, np.float64)
        lo, hi = np.percentile(v, [1, 99])
    g = np.rint(np.clip((v - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        g = 255 - g                                  # after rounding, so the inversion is exact
    return Image.fromarray(g), patient


_OPTS = {}


def _worker_init(opts):
    _OPTS.clear()
    _OPTS.update(opts)


def _decode_task(task):
    """task = (row, name, kind, src, mask_paths). Returns (row, image, masks, info, error)."""
    row, name, kind, src, mask_paths = task
    size, channels, fit = _OPTS["size"], _OPTS["channels"], _OPTS["fit"]
    if kind == "missing":
        return row, None, None, {"missing": True}, "missing"
    if kind == "missing_masks":
        return row, None, None, None, f"no SCR mask for {[STRUCTURES[j] for j, p in enumerate(mask_paths) if not p]}"
    try:
        im, info = read_image(src, channels, size, fit, kind, _OPTS.get("dicom_window", "header"))
        image = np.asarray(im, np.uint8)
        masks = None
        if mask_paths is not None:
            masks = np.stack([np.asarray(read_image(p, 1, size, fit, "pil", resample=Image.NEAREST)[0]) > 0
                              for p in mask_paths]).astype(np.uint8)
        return row, image, masks, info, None
    except Exception as e:                           # reported with the file's name by the caller
        return row, None, None, None, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------
# Conversion engine shared by chestxray14 / eyepacs / jsrt / folder

def _iter_tasks(items, sem, archives, unexpected, stop):
    """Yield decode tasks. Items of kind "tar" are looked up by file name in the .tar(.gz) `archives`, read here
    as a stream (no unpacking) and their bytes handed to the workers; archive members nobody asked for are
    appended to `unexpected`. `sem` bounds the tasks in flight, so a fast reader never fills memory; `stop`
    ends the stream early (the consumer failed), so the pool's feeder thread never waits forever."""
    def acquire():
        sem.acquire()
        return not stop.is_set()

    pending = {}
    for row, it in enumerate(items):
        if it["kind"] == "tar":
            pending[it["name"]] = row
            continue
        if not acquire():
            return
        yield row, it["name"], it.get("decoder", "pil"), it["src"], it.get("masks")
    for archive in archives if pending else []:
        try:
            tf = tarfile.open(archive, "r|*")        # r|*: sequential stream, gz/bz2/xz/plain all work
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                row = pending.pop(base, None)
                if row is None:
                    if base.lower().endswith((".png", ".jpg", ".jpeg")):
                        unexpected.append(f"{archive.name}:{m.name}")
                    continue
                data = tf.extractfile(m).read()
                if not acquire():
                    return
                items[row]["src"] = (str(archive), m.name)
                yield row, base, items[row].get("decoder", "pil"), data, items[row].get("masks")
            tf.close()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise RuntimeError(f"archive {archive} is corrupt or truncated ({type(e).__name__}: {e}); "
                               f"download it again, or unpack what it holds and point --src at the folder") from None
    for name, row in pending.items():                # in the lists but in no folder and no archive
        if not acquire():
            return
        yield row, name, "missing", None, None


def convert(items, out, *, dataset, size, channels, fit, label_names, structures=(), extra_cols=(),
            skip_bad=False, workers=1, force=False, source="", report=None, archives=(), quiet=False,
            dicom_window="header", extra_meta=None):
    """Decode `items` (dicts with name, patient, split, labels, kind "file" (src = path) or "tar" (looked up in
    `archives`), optional decoder / masks / extra) into a cache at `out`, atomically. Returns (out, report)."""
    out = Path(out)
    report = dict(report or {})
    n, S = len(items), len(structures)
    if n == 0:
        raise ValueError(f"no images to convert for {dataset} (see the report above)")
    tmp = _start_tmp(out, force, need=n * size * size * (channels + S))
    try:
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, shape)
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, S, size, size)) if S else None
        reserve(tmp / "images.npy")
        if S:
            reserve(tmp / "masks.npy")
        ok = np.zeros(n, bool)
        bad, missing, unexpected, sizes, modes = [], [], [], Counter(), Counter()
        sem, stop = threading.Semaphore(max(4, 16 * workers) if workers > 1 else 10 ** 9), threading.Event()
        opts = dict(size=size, channels=channels, fit=fit, dicom_window=dicom_window)
        pool = None
        if workers > 1:
            pool = mp.get_context("fork").Pool(workers, _worker_init, (opts,))
            results = pool.imap_unordered(_decode_task, _iter_tasks(items, sem, archives, unexpected, stop),
                                         chunksize=1)
        else:
            _worker_init(opts)
            results = map(_decode_task, _iter_tasks(items, sem, archives, unexpected, stop))
        prog = None if quiet else _progress(n, dataset)
        try:
            for done, (row, img, m, info, err) in enumerate(results, 1):
                sem.release()
                if info and info.get("missing"):
                    missing.append(items[row]["name"])
                elif err is not None:
                    src = items[row]["src"]
                    where = "%s:%s" % tuple(src) if isinstance(src, tuple) else src
                    if not skip_bad:
                        raise RuntimeError(f"bad source image {where}: {err} (use --skip-bad to skip and report "
                                           f"such files)")
                    bad.append({"name": items[row]["name"], "file": str(where), "error": err})
                else:
                    images[row], ok[row] = img, True
                    if masks is not None:
                        masks[row] = m
                    sizes[info["size"]] += 1
                    modes[info["mode"]] += 1
                if prog:
                    prog.update()
                _maybe_die(done)
        finally:
            stop.set()
            sem.release()                            # wake the feeder if it waits for a slot; it then stops
            if pool:
                pool.terminate()
        if prog:
            prog.close()
        images.flush()
        del images
        if masks is not None:
            masks.flush()
            del masks
        keep = np.flatnonzero(ok)
        if len(keep) == 0:
            raise ValueError(f"no readable images for {dataset}; first error: {bad[0] if bad else '?'}")
        if len(keep) < n:                            # drop bad rows: chunked copy into a compact array
            for fname in ["images.npy"] + (["masks.npy"] if S else []):
                src = np.load(tmp / fname, mmap_mode="r")
                dst = np.lib.format.open_memmap(tmp / (fname + ".compact"), "w+", np.uint8,
                                                (len(keep),) + src.shape[1:])
                reserve(tmp / (fname + ".compact"))
                for a in range(0, len(keep), 256):
                    dst[a:a + 256] = src[keep[a:a + 256]]
                dst.flush()
                del src, dst
                os.replace(tmp / (fname + ".compact"), tmp / fname)
        rows = []
        for new_i, row in enumerate(keep):
            it = items[row]
            rows.append(dict(it.get("extra", {}), i=new_i, name=it["name"], patient=it["patient"],
                             split=it["split"], labels=it["labels"]))
        _write_index(tmp / "index.csv", rows, extra_cols)
        split_counts = Counter(r["split"] for r in rows)
        report.setdefault("missing_files", []).extend(missing)
        report.setdefault("not_in_csv_or_lists", []).extend(unexpected)
        report.update(converted=len(keep), bad=bad, source_sizes=dict(sizes.most_common()),
                      source_modes=dict(modes.most_common()), splits=dict(split_counts))
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        meta = dict(dataset=dataset, count=int(len(keep)), height=size, width=size, channels=channels,
                    label_names=list(label_names), structures=list(structures), landmark_names=[],
                    source=str(source), fit=fit, resample="PIL BILINEAR", bad_skipped=len(bad), **(extra_meta or {}))
        out = _finish_tmp(tmp, out, meta, force)
        return out, report
    except BaseException as e:
        _abort_tmp(tmp, out, e)
        raise


def print_report(report, file=sys.stderr):
    """Human summary of a report dict (the full one is in <out>/report.json)."""
    for k, v in report.items():
        if isinstance(v, list):
            shown = ", ".join(x if isinstance(x, str) else f"{x.get('file', x)} ({x.get('error', '')})" for x in v[:5])
            print(f"  {k}: {len(v)}" + (f"  [{shown}{', ...' if len(v) > 5 else ''}]" if v else ""), file=file)
        else:
            print(f"  {k}: {v}", file=file)


def _walk(src, exts):
    """All files under src whose lower-case suffix is in exts, sorted, as {relative posix path: Path}; hidden files
    and folders (names starting with a dot) are skipped."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))   # hidden: data_prep's temporary folders,
        for f in sorted(filenames):                                           # macOS' ._* files, ...
            if f.lower().endswith(exts) and not f.startswith("."):
                p = Path(dirpath) / f
                found[p.relative_to(src).as_posix()] = p
    return found


def patient_split(counts, val_fraction, seed=0):
    """Deterministic patient-level split. counts: {patient: number of images}. Patients in a seeded random order
    fill the validation set greedily up to round(val_fraction * images) images (skipping any patient that would
    overshoot); the rest is train. Returns the set of validation patients. On ChestX-ray14-sized data the count
    is exact (most patients have few images); on tiny data it is close."""
    order = sorted(counts)
    rng = np.random.default_rng(seed)
    order = [order[j] for j in rng.permutation(len(order))]
    target = int(round(val_fraction * sum(counts[p] for p in order)))
    val, got = set(), 0
    for p in order:
        if got + counts[p] <= target:
            val.add(p)
            got += counts[p]
        if got == target:
            break
    return val


# ----------------------------------------------------------------------------------------------------
# Datasets: turn a downloaded tree into items + a report, then convert()

def _find(found, names, src, what):
    """The file among `found` (relative paths) whose base name is the first of `names` present."""
    for n in names:
        hits = [p for rel, p in found.items() if rel.rsplit("/", 1)[-1] == n]
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{what}: none of {names} found under {src}")


def _read_list(path):
    return [l.strip() for l in Path(path).read_text().splitlines() if l.strip()]


def _repeats(names, where):
    """'WHERE: NAME' for each name given more than once (kept once, and reported: duplicate_* in report.json)."""
    return [f"{where}: {n}" for n, c in Counter(names).items() if c > 1]


def _need_columns(path, header, need):
    """ValueError naming the columns a table lacks. A header read as one column that holds ';', a tab or '|' means
    the file has another separator, and the message says so."""
    lacking = [c for c in need if c not in header]
    if lacking:
        sep = next((c for c in (";", "\t", "|") if len(header) == 1 and c in header[0]), None)
        said = f"it is separated by {sep!r}: save it comma-separated" if sep else f"its columns are {header}"
        raise ValueError(f"{path}: no column(s) {lacking}; {said}")


def split_lists(train_list, val_list, csv_rows, train_val, test):
    """--train-list / --val-list -> {name: "train" or "val"}: one image a line, its name first (further columns, such
    as the labels of the authors' Xray14_train_official.txt, are ignored). Checked, the first fault an error naming
    the file, line and image: every name is an image of the label CSV and of train_val_list.txt (not test_list.txt),
    listed once, in one list only, and no patient has images in both lists."""
    split_of, first_of_patient = {}, {}
    for flag, path, split in (("--train-list", train_list, "train"), ("--val-list", val_list, "val")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
        for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            name = line.split()[0]
            where = f"{flag} {path} line {line_no}: {name}"
            if name not in csv_rows or name in test or name not in train_val:
                why = ("is not an image of the label CSV" if name not in csv_rows else
                       "is in test_list.txt, the test split" if name in test else "is not in train_val_list.txt")
                raise ValueError(f"{where} {why}")
            if name in split_of:
                raise ValueError(f"{where} is listed twice" if split_of[name] == split else
                                 f"{where} is also in --train-list {train_list}")
            patient = csv_rows[name]["patient"]
            other, other_split = first_of_patient.setdefault(patient, (name, split))
            if other_split != split:
                raise ValueError(f"{where}: its patient {patient} also has {other} in --train-list {train_list}")
            split_of[name] = split
    return split_of


def chestxray14_items(src, val_seed=0, train_list=None, val_list=None):
    """ChestX-ray14 (docs/METHOD.md §9): images/ or images_0NN/images/ folders and/or the .tar.gz archives,
    Data_Entry_2017(_v2020).csv, train_val_list.txt, test_list.txt. train_list + val_list: the train/val split from
    these lists (split_lists) instead of our patient-level split of train_val_list.txt."""
    src = Path(src)
    found = _walk(src, (".png", ".csv", ".txt", ".tar.gz", ".tgz", ".tar"))
    entry = _find(found, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"], src, "ChestX-ray14 label CSV")
    train_val = _read_list(_find(found, ["train_val_list.txt"], src, "ChestX-ray14 split list"))
    test = _read_list(_find(found, ["test_list.txt"], src, "ChestX-ray14 split list"))
    pngs, dup = {}, []
    for rel, p in found.items():
        if rel.endswith(".png"):
            (dup.append(rel) if p.name in pngs else pngs.__setitem__(p.name, p))
    archives = [p for rel, p in found.items() if rel.endswith((".tar.gz", ".tgz", ".tar"))]
    csv_rows, line_of, dup_rows = {}, {}, []
    with open(entry, newline="", encoding="utf-8-sig") as f:
        rd = csv.reader(f)
        header = next(rd, [])
        _need_columns(entry, header, ["Image Index", "Finding Labels"])
        name_col, label_col = header.index("Image Index"), header.index("Finding Labels")
        pid_col = header.index("Patient ID") if "Patient ID" in header else None
        view_col = header.index("View Position") if "View Position" in header else None
        width = max(c for c in (name_col, label_col, pid_col, view_col) if c is not None) + 1
        for line, r in enumerate(rd, 2):
            if not r:
                continue
            if len(r) < width:
                raise ValueError(f"{entry} line {line}: {len(r)} field(s), the header has {len(header)}")
            labels = [] if r[label_col] == "No Finding" else r[label_col].split("|")
            unknown = [l for l in labels if l not in CXR14_LABELS]
            if unknown:
                raise ValueError(f"{entry} line {line}: unknown label(s) {unknown}; expected {CXR14_LABELS}")
            name = r[name_col]
            rec = dict(labels=labels, patient=r[pid_col] if pid_col is not None else name.split("_")[0],
                       view=r[view_col] if view_col is not None else "")
            if name in csv_rows:                     # a repeated row must say the same
                if csv_rows[name] != rec:
                    raise ValueError(f"{entry} line {line}: {name} repeats line {line_of[name]} with other labels, "
                                     f"patient or view; keep one of the two rows")
                dup_rows.append(f"{entry.name} line {line}: {name}")
            csv_rows.setdefault(name, rec)
            line_of.setdefault(name, line)
    both = sorted(set(train_val) & set(test))
    if both:
        raise ValueError(f"{both[0]} (and {len(both) - 1} more) in both train_val_list.txt and test_list.txt")
    listed = list(dict.fromkeys([(n, "trainval") for n in train_val] + [(n, "test") for n in test]))
    not_in_csv = [n for n, _ in listed if n not in csv_rows]
    listed = [(n, s) for n, s in listed if n in csv_rows]
    # the lists' train/val split, or our patient-level split of train_val in the authors' proportions (75,312 / 11,212)
    tv_counts = Counter(csv_rows[n]["patient"] for n, s in listed if s == "trainval")
    val_patients = patient_split(tv_counts, CXR14_VAL / (CXR14_TRAIN + CXR14_VAL), val_seed)
    split_of = split_lists(train_list, val_list, csv_rows, set(train_val), set(test)) if train_list else None
    items, missing = [], []
    for n, s in sorted(listed):
        r = csv_rows[n]
        split = "test" if s == "test" else ("val" if r["patient"] in val_patients else "train")
        if split_of is not None and s != "test":
            split = split_of.get(n)
            if split is None:                                   # in train_val_list.txt, in neither list: left out
                continue
        it = dict(name=n, patient=r["patient"], split=split, labels=r["labels"], extra=dict(view=r["view"]))
        if n in pngs:
            items.append(dict(it, kind="file", src=str(pngs[n])))
        elif archives:
            items.append(dict(it, kind="tar", src=None))
        else:
            missing.append(n)
    listed_names = set(train_val) | set(test)
    report = dict(expected_listed=len(train_val) + len(test), expected_full_dataset=112120,
                  csv=str(entry), csv_rows=len(csv_rows), png_files_found=len(pngs),
                  archives=[a.name for a in archives],
                  missing_files=missing, listed_but_not_in_csv=not_in_csv,
                  not_in_csv_or_lists=sorted(n for n in pngs if n not in csv_rows or n not in listed_names),
                  duplicate_files=dup, duplicate_rows=dup_rows,
                  duplicate_list_entries=_repeats(train_val, "train_val_list.txt") + _repeats(test, "test_list.txt"))
    if split_of is None:
        report["split_rule"] = f"train/val: patient-level split of train_val_list.txt (--val-seed {val_seed})"
    else:
        report["split_rule"] = "train/val: --train-list / --val-list"
        report["split_lists"] = {
            flag: dict(file=str(Path(path).resolve()), images=sum(1 for v in split_of.values() if v == split),
                       sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest())
            for flag, path, split in (("train_list", train_list, "train"), ("val_list", val_list, "val"))}
        report["train_val_in_neither_list"] = sorted(n for n in set(train_val) if n in csv_rows and n not in split_of)
    return items, archives, report


def eyepacs_items(src, val_fraction=0.1, seed=0):
    """EyePACS (Kaggle DR): train/*.jpeg + trainLabels.csv (image,level); optionally test/*.jpeg +
    retinopathy_solution.csv (image,level,Usage) -> split test. Patient = the number before _left/_right;
    train is split into train/val by patient (val_fraction of the images)."""
    src = Path(src)
    found = _walk(src, (".jpeg", ".jpg", ".png", ".csv"))
    files = {}
    for rel, p in found.items():
        if not rel.endswith(".csv"):
            files.setdefault(p.stem, p)
    sources = [(_find(found, ["trainLabels.csv"], src, "EyePACS labels"), "train")]
    try:
        sources.append((_find(found, ["retinopathy_solution.csv"], src, ""), "test"))
    except FileNotFoundError:
        pass
    rows, dup_rows = {}, []
    for path, split in sources:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rd = csv.DictReader(f)
            _need_columns(path, rd.fieldnames or [], ["image", "level"])
            for line, r in enumerate(rd, 2):
                if r.get("image") is None or r.get("level") not in {"0", "1", "2", "3", "4"}:
                    raise ValueError(f"{path} line {line}: need columns image,level with level in 0..4, got {r}")
                if r["image"] in rows:               # a repeated row must say the same
                    if rows[r["image"]] != (split, r["level"]):
                        raise ValueError(f"{path} line {line}: {r['image']} is listed again with another level or "
                                         f"split; keep one of the two rows")
                    dup_rows.append(f"{path.name} line {line}: {r['image']}")
                rows[r["image"]] = (split, r["level"])
    counts = Counter(n.split("_")[0] for n, (s, _) in rows.items() if s == "train" and n in files)
    val_patients = patient_split(counts, val_fraction, seed)
    items = []
    for n, (split, level) in sorted(rows.items()):
        if n not in files:
            continue
        patient = n.split("_")[0]
        split = "val" if split == "train" and patient in val_patients else split
        items.append(dict(name=n, patient=patient, split=split, labels=[f"grade{level}"], kind="file",
                          src=str(files[n]), extra=dict(level=level)))
    report = dict(expected=len(rows), label_csvs=[str(p) for p, _ in sources], image_files_found=len(files),
                  missing_files=sorted(n for n in rows if n not in files),
                  not_in_csv_or_lists=sorted(n for n in files if n not in rows), duplicate_rows=dup_rows)
    return items, report


SCR_FOLDERS = {"heart": "heart", "left clavicle": "left_clavicle", "right clavicle": "right_clavicle",
               "left lung": "left_lung", "right lung": "right_lung"}


def jsrt_items(src, masks_dir=None, val_every=8):
    """JSRT .IMG files (+ SCR masks). Split: SCR's two folds when the masks sit under fold1/ fold2/ folders
    (fold1 -> train, fold2 -> test, the usual SCR protocol), otherwise alternate sorted names (train, test, ...);
    every `val_every`-th train image (sorted) becomes val. Label "nodule" for JPCLN* (nodule) images."""
    src = Path(src)
    imgs = {p.stem.upper(): p for p in _walk(src, (".img",)).values()}
    masks, fold = {}, {}
    if masks_dir is not None:
        for rel, p in _walk(Path(masks_dir), (".gif", ".png")).items():
            parts = [x.lower().replace("_", " ") for x in rel.split("/")[:-1]]
            struct = next((SCR_FOLDERS[x] for x in reversed(parts) if x in SCR_FOLDERS), None)
            if struct is None:
                continue
            stem = p.stem.upper()
            masks.setdefault(stem, {})[struct] = str(p)
            f = next((x for x in parts if x in ("fold1", "fold2")), None)
            if f:
                fold[stem] = f
    names = sorted(imgs)
    items, no_masks = [], []
    for j, n in enumerate(names):
        split = {"fold1": "train", "fold2": "test"}.get(fold.get(n)) or ("train" if j % 2 == 0 else "test")
        it = dict(name=n, patient=n, split=split, labels=["nodule"] if n.startswith("JPCLN") else [],
                  kind="file", src=str(imgs[n]), decoder="jsrt")
        if masks_dir is not None:
            have = masks.get(n, {})
            lacking = [s for s in STRUCTURES if s not in have]
            if lacking:
                no_masks.append(f"{n} (missing {lacking})")
                it["decoder"] = "missing_masks"                  # a bad item: error, or skipped with --skip-bad
            it["masks"] = [have.get(s) for s in STRUCTURES]
        items.append(it)
    train = [it for it in items if it["split"] == "train"]
    for j, it in enumerate(train):
        if j % val_every == val_every - 1:
            it["split"] = "val"
    report = dict(expected=247, img_files_found=len(imgs), masks_dir=str(masks_dir) if masks_dir else None,
                  images_with_all_masks=sum(len(masks.get(n, {})) == len(STRUCTURES) for n in names),
                  images_without_masks=no_masks, masks_without_image=sorted(set(masks) - set(imgs)),
                  split_rule="SCR folds" if fold else "alternating sorted names")
    return items, report


# Patients from paths. A patient-level split needs the patient, and most trees carry it in a folder name:
# CheXpert (train/patient00001/study1/view1_frontal.jpg), MIMIC-CXR-JPG (files/p10/p10000032/s50414267/<id>.jpg).
AUTO_PATIENT_FOLDER = re.compile(r"patient\d+|p\d{8}")
PATIENT_FROM_HELP = ("where the patient of an image comes from (the split is by patient): 'auto' (default) = the "
                     "DICOM PatientID when the file has one, else the nearest folder named like patient00001 "
                     "(CheXpert) or p10000032 (MIMIC-CXR), else the file stem; 'stem' = the file stem; 'dicom' = "
                     "the DICOM PatientID; 'up:N' = the folder N levels above the file (CheXpert "
                     "patient00001/study1/view1.jpg: up:2); or a regular expression with one group searched in "
                     "the relative path, e.g. '(patient\\d+)/'")


def _dicom_patient(path):
    """The PatientID of a DICOM file's header ("" when absent or unreadable: the decoder then names the file)."""
    import pydicom                                   # header only: the patient must be known before splitting
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("PatientID", "") or "")
    except Exception:
        return ""


def patient_rule(spec):
    """--patient-from SPEC -> rule(rel, path) -> (patient, how): rel is the image's relative posix path, path the
    file (None when it is missing), how a short description counted in the report. ValueError on a bad SPEC;
    the rule raises ValueError naming the path when it cannot name a patient."""
    pattern = None
    if spec not in ("auto", "stem", "dicom") and not re.fullmatch(r"up:[1-9]\d*", spec):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"--patient-from {spec!r}: not auto, stem, dicom, up:N or a valid regular expression "
                             f"({e})") from None
        if pattern.groups != 1:
            raise ValueError(f"--patient-from {spec!r}: the regular expression needs exactly one group (...) "
                             f"around the patient, e.g. '(patient\\d+)/'")

    def rule(rel, path):
        parts = rel.split("/")
        is_dicom = rel.lower().endswith((".dcm", ".dicom"))
        if spec in ("auto", "dicom") and is_dicom and path is not None:
            pid = _dicom_patient(path)
            if pid:
                return pid, "DICOM PatientID"
        if spec == "dicom":
            raise ValueError(f"{rel}: no DICOM PatientID (--patient-from dicom); pick another --patient-from")
        if spec == "auto":
            for d in reversed(parts[:-1]):           # the nearest folder named like a patient
                if AUTO_PATIENT_FOLDER.fullmatch(d):
                    return d, "folder named like a patient (patient\\d+ or p\\d{8})"
            return Path(rel).stem, "file stem"
        if spec == "stem":
            return Path(rel).stem, "file stem"
        if pattern is None:                          # up:N, named by its path so equal names in two trees differ
            n = int(spec[3:])
            if len(parts) <= n:
                raise ValueError(f"{rel}: --patient-from {spec} needs {n} folder(s) above the file")
            return "/".join(parts[:-n]), f"folder {spec}"
        m = pattern.search(rel)
        if m is None or not m.group(1):
            raise ValueError(f"{rel}: --patient-from {spec!r} does not match this path")
        return m.group(1), f"regular expression {spec!r}"
    return rule


def _apply_patients(items, spec, report):
    """Set it["patient"] for every item by --patient-from and record in the report which rule named how many."""
    rule, how = patient_rule(spec), Counter()
    for it in items:
        it["patient"], h = rule(it["name"], it.get("src"))
        how[h] += 1
    report["patient_from"] = spec
    report["patient_rule_counts"] = dict(how.most_common())
    report["patients"] = len({it["patient"] for it in items})


def folder_items(src, patient_from="auto"):
    """Any folder of PNG/JPEG/DICOM images (recursive). Name = relative path; patient by --patient-from (default
    auto: DICOM PatientID, else a patient-named folder, else the file stem); all split=train (a folder carries
    no split; use --val-fraction to hold out patients)."""
    src = Path(src)
    found = plain_images(src, IMAGE_EXTS, "--src")
    items = [dict(name=rel, patient="", split="train", labels=[], kind="file", src=str(p),
                  decoder="dicom" if rel.lower().endswith((".dcm", ".dicom")) else "pil") for rel, p in found.items()]
    report = dict(image_files_found=len(items))
    _apply_patients(items, patient_from, report)
    return items, report


# ----------------------------------------------------------------------------------------------------
# Any labelled dataset shipped as images plus a table (CheXpert, VinDr-CXR, MIMIC-CXR-JPG, in-house)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
# CheXpert's label values (Irvin et al. 2019): 1 positive, 0 negative, -1 uncertain, blank = not mentioned.
POSITIVE, NEGATIVE, UNCERTAIN = {"1", "1.0", "1.00"}, {"0", "0.0", "0.00"}, {"-1", "-1.0", "-1.00"}


def _resolver(found):
    """rel path in a table -> relative path of an existing file, or None. Tables name images relative to some
    folder (CheXpert: 'CheXpert-v1.0-small/train/patient00001/...'), and --src may be that folder, a parent of
    it or a child: an exact match wins, then the path with leading folders dropped, then the unique file whose
    path ends with it. Bare file names are matched only exactly or when unique."""
    suffix = {}
    for rel in found:
        parts = rel.split("/")
        for j in range(len(parts)):
            key = "/".join(parts[j:])
            suffix[key] = None if key in suffix and suffix[key] != rel else rel   # None: ambiguous
    def resolve(p):
        p = p.replace("\\", "/").strip("/")
        if p in found:
            return p
        parts = p.split("/")
        for j in range(len(parts)):
            hit = suffix.get("/".join(parts[j:]))
            if hit:
                return hit
        return None
    return resolve


def _label_value(v, policy_uncertain, policy_blank, where):
    """One cell of a wide label table -> (positive?, uncertain?)."""
    v = v.strip()
    if v in POSITIVE:
        return True, False
    if v in NEGATIVE:
        return False, False
    if v in UNCERTAIN:
        return policy_uncertain == "positive", True
    if v == "":
        if policy_blank == "error":
            raise ValueError(f"{where}: blank label (--blank error); use --blank negative to read blank as "
                             f"'not mentioned' = negative, as CheXpert's labeller means it")
        return False, False
    raise ValueError(f"{where}: label value {v!r} is not 1, 0, -1 (uncertain) or blank")


def csv_items(src, csvs, image_col, label_cols=(), label_col=None, no_label=("No Finding", "No finding"),
              patient_col=None, patient_from="auto", split_col=None, uncertain="negative", blank="negative",
              image_path="{}", keep_cols=(), where=(), val_fraction=None, test_fraction=None, seed=0):
    """Images plus one or more tables -> items + report. csvs: [(path, split or None)] (a split given with the
    file, e.g. CheXpert's valid.csv as test). Labels: wide (label_cols: one column per label with 1 / 0 / -1 /
    blank, CheXpert and MIMIC-CXR's labeller) or long (label_col: label names, '|'-separated, rows of one image
    merged; VinDr-CXR's annotations, ChestX-ray14's Finding Labels). Patient: patient_col, else patient_from on
    the image's path. Split: split_col, else the file's split, else patient-level: test_fraction then
    val_fraction of the images (by patient; defaults 0.2 and 0.1, or 0 where a table already gives that split)."""
    patient_rule(patient_from)                       # a bad --patient-from fails before the tables are read
    src = Path(src)
    found = _walk(src, IMAGE_EXTS)
    resolve = _resolver(found)
    wide = bool(label_cols)
    rows, order, dup_rows, filtered, line_of = {}, [], [], 0, {}
    for path, file_split in csvs:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--csv {path}: no such file")
        with open(path, newline="", encoding="utf-8-sig") as f:
            rd = csv.DictReader(f)
            header = rd.fieldnames or []
            need = [image_col, *label_cols, *([label_col] if label_col else []), *([patient_col] if patient_col else []),
                    *([split_col] if split_col else []), *keep_cols, *(w[0] for w in where)]
            _need_columns(path, header, need)
            for line, r in enumerate(rd, 2):
                at = f"{path} line {line}"
                if any((r[c] or "").strip() != v for c, v in where):
                    filtered += 1
                    continue
                cell = (r[image_col] or "").strip()
                if not cell:
                    raise ValueError(f"{at}: empty {image_col!r}")
                name = image_path.format(cell)
                if wide:
                    pos, unc = [], []
                    for c in label_cols:
                        p, u = _label_value(r[c] or "", uncertain, blank, f"{at} column {c!r}")
                        pos += [c] * p
                        unc += [c] * u
                else:
                    names = [x.strip() for x in (r[label_col] or "").split("|")]
                    pos, unc = sorted({x for x in names if x and x not in no_label}), []
                split = file_split
                if split_col:
                    v = (r[split_col] or "").strip().lower()
                    if v not in SPLIT_NAMES:
                        raise ValueError(f"{at}: {split_col!r} is {r[split_col]!r}; expected one of {sorted(SPLIT_NAMES)}")
                    split = SPLIT_NAMES[v]
                rec = dict(labels=pos, uncertain=unc, split=split,
                           patient=(r[patient_col] or "").strip() if patient_col else None,
                           extra={c: r[c] for c in keep_cols})
                if patient_col and not rec["patient"]:
                    raise ValueError(f"{at}: empty patient column {patient_col!r}")
                if name in rows:
                    old = rows[name]
                    if wide:                          # one row per image: a repeat must say the same
                        if (old["labels"], old["uncertain"], old["split"]) != (pos, unc, split):
                            raise ValueError(f"{at}: {name} repeats {line_of[name]} with other labels or split")
                        dup_rows.append(at)
                    else:                             # long tables: one row per finding (and reader), merged
                        if old["split"] != split or old["patient"] != rec["patient"]:
                            raise ValueError(f"{at}: {name} repeats {line_of[name]} with another split or patient")
                        old["labels"] = sorted(set(old["labels"]) | set(pos))
                    continue
                rows[name], line_of[name] = rec, at
                order.append(name)
    label_names = list(label_cols) if wide else sorted({l for r in rows.values() for l in r["labels"]})
    items, missing = [], []
    for name in sorted(order):
        r = rows[name]
        rel = resolve(name)
        if rel is None:
            missing.append(name)
            continue
        items.append(dict(name=rel, patient=r["patient"], split=r["split"], labels=r["labels"], kind="file",
                          src=str(found[rel]), decoder="dicom" if rel.lower().endswith((".dcm", ".dicom")) else "pil",
                          extra=dict(r["extra"], uncertain="|".join(r["uncertain"]))))
    report = dict(csvs=[f"{p}" + (f" (split {s})" if s else "") for p, s in csvs], csv_rows=len(order) + len(dup_rows),
                  rows_filtered_out=filtered, expected=len(order), image_files_found=len(found),
                  missing_files=missing, not_in_csv_or_lists=sorted(set(found) - {it["name"] for it in items}),
                  duplicate_rows=dup_rows, resolved_by_suffix=sum(it["name"] not in rows for it in items),
                  label_format="wide (one column per label)" if wide else f"long ({label_col!r}, names merged per image)",
                  uncertain_policy=uncertain if wide else None, blank_policy=blank if wide else None)
    if patient_col:
        report.update(patient_from=f"column {patient_col!r}", patients=len({it["patient"] for it in items}))
    else:
        _apply_patients(items, patient_from, report)
    _split_by_patient(items, val_fraction, test_fraction, seed, report)
    report["label_counts"] = {s: dict(Counter(l for it in items if it["split"] == s for l in it["labels"]))
                              for s in ("train", "val", "test")}
    if wide:
        report["uncertain_counts"] = dict(Counter(l for it in items for l in it["extra"]["uncertain"].split("|") if l))
    return items, report, label_names


def _split_by_patient(items, val_fraction, test_fraction, seed, report):
    """Give a split to the items the tables left without one, by patient: a patient with rows of a given split keeps
    it for all its rows; the other patients go to test, then val, by patient_split (test_fraction / val_fraction
    of all images; default 0.2 / 0.1, 0 where the tables already provide that split). Patients that the tables
    themselves put in two splits are kept as given and listed in the report."""
    given = {}
    for it in items:
        if it["split"]:
            given.setdefault(it["patient"], set()).add(it["split"])
    have = {s for ss in given.values() for s in ss}
    test_fraction = (0.0 if "test" in have else 0.2) if test_fraction is None else test_fraction
    val_fraction = (0.0 if "val" in have else 0.1) if val_fraction is None else val_fraction
    free = Counter(it["patient"] for it in items if not it["split"] and it["patient"] not in given)
    total = len(items)
    test = patient_split(free, test_fraction * total / max(sum(free.values()), 1), seed) if test_fraction else set()
    rest = Counter({p: c for p, c in free.items() if p not in test})
    val = patient_split(rest, val_fraction * total / max(sum(rest.values()), 1), seed + 1) if val_fraction else set()
    for it in items:
        if not it["split"]:
            own = given.get(it["patient"])
            it["split"] = (sorted(own)[0] if own and len(own) == 1 else
                           "test" if it["patient"] in test else "val" if it["patient"] in val else "train")
    splits_of = {}
    for it in items:
        splits_of.setdefault(it["patient"], set()).add(it["split"])
    report["split_rule"] = (f"patient-level: test {test_fraction:g}, val {val_fraction:g} of the images "
                            f"(seed {seed}) for rows the tables leave without a split")
    report["patients_per_split"] = dict(Counter(s for ss in splits_of.values() for s in ss))
    report["patients_in_two_splits"] = sorted(p for p, ss in splits_of.items() if len(ss) > 1)


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


# ----------------------------------------------------------------------------------------------------
# Command line

def _scan(args):
    """Dataset-specific scan of --src: (items, archives, report, convert() keywords)."""
    archives = ()
    if args.dataset == "chestxray14":
        items, archives, report = chestxray14_items(args.src, args.val_seed, args.train_list, args.val_list)
        kw = dict(channels=1, label_names=CXR14_LABELS, extra_cols=["view"])
    elif args.dataset == "eyepacs":
        items, report = eyepacs_items(args.src, seed=args.val_seed)
        kw = dict(channels=3, label_names=[f"grade{k}" for k in range(5)], extra_cols=["level"])
    elif args.dataset == "jsrt":
        items, report = jsrt_items(args.src, args.masks)
        kw = dict(channels=1, label_names=["nodule"], structures=STRUCTURES if args.masks else ())
    elif args.dataset == "csv":
        items, report, label_names = csv_items(
            args.src, args.csv, args.image_col, label_cols=args.label_cols, label_col=args.label_col,
            no_label=args.no_label, patient_col=args.patient_col, patient_from=args.patient_from,
            split_col=args.split_col, uncertain=args.uncertain, blank=args.blank, image_path=args.image_path,
            keep_cols=args.keep_cols, where=args.where, val_fraction=args.val_fraction,
            test_fraction=args.test_fraction, seed=args.split_seed)
        kw = dict(channels=args.channels, label_names=label_names, dicom_window=args.dicom_window,
                  extra_cols=[*args.keep_cols, "uncertain"] if args.label_cols else list(args.keep_cols),
                  extra_meta=dict(label_kind="multilabel", uncertain_policy=report["uncertain_policy"],
                                  blank_policy=report["blank_policy"]))
    else:
        items, report = folder_items(args.src, args.patient_from)
        if args.val_fraction > 0:
            counts = Counter(it["patient"] for it in items)
            val = patient_split(counts, args.val_fraction)
            for it in items:
                it["split"] = "val" if it["patient"] in val else "train"
        kw = dict(channels=args.channels, label_names=[], dicom_window=args.dicom_window)
    return items, archives, report, kw


def _comma_list(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def _csv_arg(s):
    """--csv [SPLIT=]FILE -> (Path, split or None)."""
    head, eq, tail = s.partition("=")
    if eq and head.lower() in SPLIT_NAMES and tail:
        return Path(tail), SPLIT_NAMES[head.lower()]
    return Path(s), None


def _where_arg(s):
    col, eq, value = s.partition("=")
    if not eq or not col:
        raise argparse.ArgumentTypeError(f"{s!r}: expected COL=VALUE")
    return col, value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See README 'Data'.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="dataset", required=True)
    cmds = {
        "phantom": "procedural chest radiographs with masks, landmarks and findings (no download)",
        "chestxray14": "NIH ChestX-ray14: images/ or images_0NN/images/ folders or the .tar.gz archives, plus "
                       "Data_Entry_2017(_v2020).csv, train_val_list.txt, test_list.txt",
        "eyepacs": "Kaggle EyePACS: train/*.jpeg + trainLabels.csv (optional test/ + retinopathy_solution.csv)",
        "jsrt": "JSRT .IMG radiographs (+ SCR masks via --masks) for segmentation",
        "folder": "any folder of PNG / JPEG / DICOM images (recursive), unlabelled",
        "csv": "any labelled dataset shipped as images plus a table (CheXpert, VinDr-CXR, MIMIC-CXR-JPG, in-house): "
               "labels per image, patient-level split, the same checks and report",
    }
    for name, help in cmds.items():
        p = sub.add_parser(name, help=help, description=help)
        g = p.add_argument_group("input / output")
        if name != "phantom":
            g.add_argument("--src", required=True, type=Path, help="the downloaded folder (searched recursively)")
        g.add_argument("--out", type=Path, default=None, help=f"cache folder to create (default data/{name})")
        g.add_argument("--force", action="store_true", help="rebuild even if --out already holds a cache")
        size_help = {
            "chestxray14": "side of the cached square images. 1024 (default): the originals' pixels, unresampled, "
                           "so a level-4 part is 256 px as in the authors' code; 112,120 images take 117.6 GB "
                           "(109.5 GiB). 512 (29.4 GB) if disk is short: level-4 parts are then 128 px, upsampled "
                           "1.75-3.9x into a 224 px view. The input pipeline costs the same CPU per image at every "
                           "size (README 'Resolution').",
            "phantom": "side of the phantom images (256 default; 64 for tests)",
        }.get(name, "side of the cached square images (default 512)")
        g.add_argument("--size", type=int, default=DEFAULT_SIZE[name], help=size_help)
        if name == "phantom":
            g.add_argument("--num-images", type=int, default=1000, help="how many phantoms (split 70/10/20)")
            g.add_argument("--seed", type=int, default=0, help="the phantom set is a pure function of the seed")
        else:
            g.add_argument("--skip-bad", action="store_true",
                           help="skip unreadable / truncated files and list them in report.json instead of failing")
            g.add_argument("--fit", choices=["pad", "crop", "stretch"], default="crop" if name == "eyepacs" else "pad",
                           help="non-square images: pad to a black square (keeps all anatomy; default), take the "
                                "centred square (default for eyepacs: the retina fills the height) or stretch")
        if name == "jsrt":
            g.add_argument("--masks", type=Path, default=None,
                           help="SCR root; searched recursively for <image>.gif under folders named heart, "
                                "left clavicle, right clavicle, left lung, right lung")
        if name == "csv":
            t = p.add_argument_group("the table")
            t.add_argument("--csv", action="append", required=True, type=_csv_arg, metavar="[SPLIT=]FILE",
                           help="the label table; repeatable (rows of several tables are merged); SPLIT=FILE gives "
                                "every row of FILE that split (train, val or test), e.g. --csv train.csv "
                                "--csv test=valid.csv for CheXpert")
            t.add_argument("--image-col", required=True, help="column naming the image, a path relative to --src "
                           "(leading folders that --src already is are dropped; e.g. CheXpert's Path)")
            t.add_argument("--image-path", default="{}", help="turns the image column into a path, e.g. "
                           "'train/{}.dicom' when the column holds bare ids (VinDr-CXR's image_id)")
            lab = t.add_mutually_exclusive_group(required=True)
            lab.add_argument("--label-cols", type=_comma_list, default=[],
                             help="comma list of label columns, one per label, values 1 / 0 / -1 (uncertain) / "
                                  "blank (not mentioned), as in CheXpert and MIMIC-CXR's chexpert.csv")
            lab.add_argument("--label-col", default=None,
                             help="one column of label names ('|'-separated); several rows of one image are merged "
                                  "(VinDr-CXR's annotations: class_name)")
            t.add_argument("--no-label", type=_comma_list, default=["No Finding", "No finding"],
                           help="with --label-col: names that mean no label")
            t.add_argument("--uncertain", choices=["negative", "positive"], default="negative",
                           help="with --label-cols: what -1 (uncertain) becomes: negative = CheXpert's U-Zeros, "
                                "positive = U-Ones (Irvin et al. 2019). Either way index.csv's 'uncertain' column "
                                "lists them, so no information is lost")
            t.add_argument("--blank", choices=["negative", "error"], default="negative",
                           help="with --label-cols: a blank cell (label not mentioned) is negative, or an error")
            t.add_argument("--patient-col", default=None,
                           help="column naming the patient (e.g. MIMIC's subject_id); default: --patient-from")
            t.add_argument("--split-col", default=None,
                           help="column with train / val (valid, validation, dev) / test; default: the file's "
                                "SPLIT= or a patient-level split")
            t.add_argument("--val-fraction", type=float, default=None,
                           help="patient-level split of rows without a split: this fraction of images to val "
                                "(default 0.1; 0 when a table already gives val rows)")
            t.add_argument("--test-fraction", type=float, default=None,
                           help="the same for test (default 0.2; 0 when a table already gives test rows)")
            t.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split")
            t.add_argument("--keep-cols", type=_comma_list, default=[],
                           help="more columns copied into index.csv (e.g. 'Frontal/Lateral,AP/PA,Sex,Age')")
            t.add_argument("--where", action="append", type=_where_arg, default=[], metavar="COL=VALUE",
                           help="keep only rows whose COL is VALUE (repeatable), e.g. 'Frontal/Lateral=Frontal'; "
                                "the report counts the rows left out")
        if name in ("folder", "csv"):
            g.add_argument("--channels", type=int, choices=[1, 3], default=1, help="1 grey (X-rays) or 3 RGB")
            g.add_argument("--dicom-window", choices=["header", "percentile"], default="header",
                           help="DICOM grey window: header = the file's VOI LUT or window (pydicom's "
                                "apply_voi_lut), or its 1st..99th percentiles when it has none; percentile = always "
                                "the percentiles (use it when the header window spans the whole range and images "
                                "look flat)")
            g.add_argument("--patient-from", default="auto", help=PATIENT_FROM_HELP)
        if name == "folder":
            g.add_argument("--val-fraction", type=float, default=0.0,
                           help="hold out this fraction of images (by patient) as split=val; default all train")
        if name in ("chestxray14", "eyepacs"):
            g.add_argument("--val-seed", type=int, default=0, help="seed of the patient-level train/val split")
        if name == "chestxray14":
            g.add_argument("--train-list", type=Path, default=None, help="with --val-list: the train/val split from "
                           "lists of image names, one a line (further columns ignored), e.g. the authors' "
                           "Xray14_train_official.txt (docs/METHOD.md §5), instead of our seeded patient split")
            g.add_argument("--val-list", type=Path, default=None, help="the validation images, e.g. the authors' "
                           "Xray14_val_official.txt; checked against --train-list (no image or patient in both)")
        if name != "phantom":
            g.add_argument("--limit", type=int, default=None,
                           help="convert only the first N images (sorted by name; splits as for the full set): "
                                "a quick trial of the whole command before the long run")
        p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="decoding processes (default: all cores); 1 = in-process, easiest to debug")
    p = sub.add_parser("speed", help="images/s of cache reads vs PNG decoding (one core)")
    p.add_argument("--cache", type=Path, required=True, help="a prepared cache folder")
    p.add_argument("--n", type=int, default=200, help="random rows to read")
    args = ap.parse_args(argv)
    if args.dataset == "speed":
        r = measure_read_speed(args.cache, args.n)
        print(json.dumps(r))
        return r
    out = args.out or Path("data") / args.dataset
    for flag, low in (("size", 8), ("num_images", 1), ("workers", 1), ("limit", 1)):
        if getattr(args, flag, None) is not None and getattr(args, flag) < low:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= {low}")
    if args.dataset == "chestxray14" and (args.train_list is None) != (args.val_list is None):
        ap.error("--train-list and --val-list go together: give both, or neither for our patient-level split")
    t0 = time.time()
    if args.dataset == "phantom":
        try:
            build_phantom(out, args.num_images, args.size, args.seed, workers=args.workers, force=args.force)
        except OSError as e:                           # exists, in use, disk full: one clear line
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        print(f"wrote {out}: {args.num_images} phantoms at {args.size}px in {time.time() - t0:.1f}s", file=sys.stderr)
        return out
    if not args.src.is_dir():
        ap.error(f"--src {args.src} is not a folder")
    common = dict(size=args.size, fit=args.fit, skip_bad=args.skip_bad, workers=args.workers, force=args.force,
                  source=str(args.src.resolve()))
    try:
        items, archives, report, kw = _scan(args)
    except (OSError, ValueError, DataError) as e:      # missing CSV / list, malformed CSV: one clear line
        print(f"error: {e}\nnothing was written to {out}", file=sys.stderr)
        sys.exit(1)
    if args.limit is not None:
        items = items[:args.limit]
        report["limit"] = args.limit
    print(f"{args.dataset}: {len(items)} images to convert from {args.src}", file=sys.stderr)
    if report.get("patient_rule_counts"):
        print(f"patients: {report['patients']} by --patient-from {report['patient_from']}: "
              + ", ".join(f"{n} image(s) by {how}" for how, n in report["patient_rule_counts"].items()), file=sys.stderr)
    try:
        out, report = convert(items, out, dataset=out.name if args.dataset == "csv" else args.dataset, report=report, archives=archives, **common, **kw)
    except (RuntimeError, ValueError, OSError) as e:   # bad file, exists, in use, disk full
        print_report(report)
        print(f"error: {e}\nnothing was written to {out}", file=sys.stderr)
        sys.exit(1)
    print_report(report)
    for key in ("missing_files", "listed_but_not_in_csv", "bad", "train_val_in_neither_list"):
        if report.get(key):
            print(f"WARNING: {len(report[key])} image(s) {key.replace('_', ' ')}: left out of the cache "
                  f"(names in report.json)", file=sys.stderr)
    for key in ("duplicate_rows", "duplicate_list_entries", "duplicate_files"):
        if report.get(key):
            print(f"WARNING: {len(report[key])} {key.replace('_', ' ')}: each image taken once (the first of equal "
                  f"rows, the first file found; which ones: report.json)", file=sys.stderr)
    if report.get("patients_in_two_splits"):
        print(f"WARNING: {len(report['patients_in_two_splits'])} patient(s) in two splits, as the table's split "
              f"says (names in report.json): the split is not patient-level", file=sys.stderr)
    print(f"wrote {out} ({report['converted']} images, {args.size}px) in {time.time() - t0:.1f}s; "
          f"details in {out / 'report.json'}", file=sys.stderr)
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill`: clean up the temporary folder like Ctrl-C
    main()
