"""Opening a dataset by name or folder: the one way adam.py, finetune.py and eve.py find their images.

    open_dataset(data, root)        the cache of a named dataset (data/<name>) or of a cache folder; the phantom
                                    is generated when missing
    open_images(data, root, split)  a split's images (CacheImages), or any folder of PNG/JPEG files that is not a
                                    cache (FolderImages, decoded on the fly by read_image)

A folder is a cache only with a valid meta.json; a folder that holds a cache, an unfinished cache or data_prep's
temporary folder is refused by name (plain_images), so that a cache's splits are never read as plain images.
"""
import os
import sys
from pathlib import Path

import numpy as np

from adam_cxr.caches import DataError, open_cache
from adam_cxr.decode import read_image
from adam_cxr.phantom import ensure_phantom
from adam_cxr.safe_files import TMP_FOLDER, recover

DATASETS = ("phantom", "chestxray14", "eyepacs", "jsrt")  # names that mean a cache at data/<name>


def dataset_root(data, root=None):
    """--data NAME [--data-root DIR] -> DIR, else data/NAME for a named dataset; any other --data is the folder."""
    return Path(root) if root else Path(f"data/{data}") if data in DATASETS else Path(data)


def open_dataset(data, root=None, phantom_images=None):
    """The cache of a named dataset or of a cache folder. The phantom is generated when missing, with
    phantom_images images (default 1000); given, an existing phantom of another size gets a warning.
    FileNotFoundError naming the folder and the command that prepares it."""
    path = dataset_root(data, root)
    if not (path / "meta.json").exists():
        recover(path)                                  # a --force swap cut short leaves the old cache hidden
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
        self.name, self.warned = str(root), set()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            im, info = read_image(self.files[i])
        except Exception as e:  # PIL raises many types; the user needs the file name
            raise DataError(f"cannot read image {self.files[i]}: {e}") from e
        if info.get("warning") and i not in self.warned:   # once per file (and DataLoader worker), not per epoch
            self.warned.add(i)
            print(f"warning: {self.files[i]}: {info['warning']}", file=sys.stderr)
        return np.array(im)[None]  # 1 x H x W uint8, writable


def plain_images(root, exts, flag="--data"):
    """{relative path: file} of the images under `root` (suffixes `exts`), refusing a folder that is or holds a
    cache: reading a cache's files as plain images would mix its splits, test images included. A folder is a cache
    only with a valid meta.json (open_cache); an images.npy without one is an unfinished cache, and data_prep's
    hidden temporary folders (skipped by walk inside `root`) are refused when given themselves."""
    root = Path(root)
    m = TMP_FOLDER.fullmatch(root.name)
    if m:
        raise DataError(f"{flag} {root}: data_prep.py's temporary folder of {root.parent / m.group(1)} (a conversion "
                        f"still running, or killed); use {root.parent / m.group(1)} once data_prep.py has finished")
    found = walk(root, tuple(exts) + ("meta.json", "images.npy"))
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
        recover(path)                                  # a --force swap cut short leaves the old cache hidden
    if data in DATASETS or (path / "meta.json").exists():
        cache = open_dataset(data, root, phantom_images)
        return CacheImages(cache, split) if cache.rows(split) else None
    if not path.is_dir():
        raise FileNotFoundError(
            f"--data {data}: no such folder. Give a folder of PNG/JPEG images, or prepare a dataset "
            f"with `python data_prep.py chestxray14 --src <download> --out data/chestxray14`")
    return FolderImages(path) if split == "train" else None


def walk(src, exts):
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
