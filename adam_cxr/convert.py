"""The conversion engine shared by chestxray14 / eyepacs / jsrt / folder / csv: items (one dict per image, from
adam_cxr/scanners.py or adam_cxr/tables.py) -> a cache, decoded by worker processes, written atomically.

A bad source file is an error naming it (and nothing is written) unless skip_bad is given, in which case it is
skipped and listed in report.json. Files inside .tar(.gz) archives are read as a stream, without unpacking.
"""
import json
import os
import sys
import tarfile
import threading
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from adam_cxr.caches import STRUCTURES, kill_point, progress, publish, worker_pool, write_index
from adam_cxr.decode import read_image
from adam_cxr.safe_files import abort_tmp, reserve, start_tmp

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
    if kind == "bad_name":
        return row, None, None, None, ("its name is not UTF-8 text, which index.csv and report.json need; rename "
                                       "it (convmv -f latin1 -t utf8 renames a whole tree)")
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
    for it in items:
        if printable(it["name"]) != it["name"]:     # a file name that is not UTF-8: a bad file, named
            it["decoder"] = "bad_name"
    tmp = start_tmp(out, force, need=n * size * size * (channels + S))
    try:
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, shape)
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, (n, S, size, size)) if S else None
        reserve(tmp / "images.npy")
        if S:
            reserve(tmp / "masks.npy")
        ok = np.zeros(n, bool)
        bad, missing, unexpected, uniform, sizes, modes = [], [], [], [], Counter(), Counter()
        sem, stop = threading.Semaphore(max(4, 16 * workers) if workers > 1 else 10 ** 9), threading.Event()
        opts = dict(size=size, channels=channels, fit=fit, dicom_window=dicom_window)
        pool = None
        if workers > 1:
            pool = worker_pool(workers, _worker_init, (opts,))
            results = pool.imap_unordered(_decode_task, _iter_tasks(items, sem, archives, unexpected, stop),
                                         chunksize=1)
        else:
            _worker_init(opts)
            results = map(_decode_task, _iter_tasks(items, sem, archives, unexpected, stop))
        prog = None if quiet else progress(n, dataset)
        try:
            for done, (row, img, m, info, err) in enumerate(results, 1):
                sem.release()
                if info and info.get("missing"):
                    missing.append(items[row]["name"])
                elif err is not None:
                    where = _where(items[row])
                    if not skip_bad:
                        raise RuntimeError(f"bad source image {where}: {err} (use --skip-bad to skip and report "
                                           f"such files)")
                    bad.append({"name": printable(items[row]["name"]), "file": where, "error": err})
                else:
                    images[row], ok[row] = img, True
                    if masks is not None:
                        masks[row] = m
                    sizes[info["size"]] += 1
                    modes[info["mode"]] += 1
                    if info.get("warning"):
                        uniform.append({"file": _where(items[row]), "warning": info["warning"]})
                if prog:
                    prog.update()
                kill_point(done)
        finally:
            stop.set()
            sem.release()                            # wake the feeder if it waits for a slot; it then stops
            if pool:
                pool.terminate()
            if prog:
                prog.close()                         # here: an error's line then follows the bar's last one
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
        write_index(tmp / "index.csv", rows, extra_cols)
        split_counts = Counter(r["split"] for r in rows)
        report.setdefault("missing_files", []).extend(missing)
        report.setdefault("not_in_csv_or_lists", []).extend(unexpected)
        report.update(converted=len(keep), bad=bad, nearly_uniform=uniform, source_sizes=dict(sizes.most_common()),
                      source_modes=dict(modes.most_common()), splits=dict(split_counts))
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        meta = dict(dataset=dataset, count=int(len(keep)), height=size, width=size, channels=channels,
                    label_names=list(label_names), structures=list(structures), landmark_names=[],
                    source=str(source), fit=fit, resample="PIL BILINEAR", bad_skipped=len(bad), **(extra_meta or {}))
        out = publish(tmp, out, meta, force)
        return out, report
    except BaseException as e:
        abort_tmp(tmp, out, e)
        raise


def printable(name):
    """A file name as text: the bytes of a name that is not UTF-8 (which os.fsdecode turns into surrogates, and
    which no UTF-8 file can hold) shown as \\xNN escapes."""
    return os.fsencode(str(name)).decode("utf-8", "backslashreplace")


def _where(item):
    """An item's file as text: its path, or ARCHIVE:MEMBER."""
    src = item["src"]
    return printable("%s:%s" % tuple(src) if isinstance(src, tuple) else src)


def print_report(report, file=None):
    """Human summary of a report dict (the full one is in <out>/report.json)."""
    file = file or sys.stderr
    for k, v in report.items():
        if isinstance(v, list):
            shown = ", ".join(x if isinstance(x, str) else x["file"] + (f" ({x['error']})" if "error" in x else "")
                              for x in v[:5])
            print(f"  {k}: {len(v)}" + (f"  [{shown}{', ...' if len(v) > 5 else ''}]" if v else ""), file=file)
        else:
            print(f"  {k}: {v}", file=file)


def print_warnings(report, file=None):
    """One WARNING line for each kind of image left out, repeated or suspicious, naming where the list is."""
    file = file or sys.stderr
    for key in ("missing_files", "listed_but_not_in_csv", "bad", "train_val_in_neither_list"):
        if report.get(key):
            print(f"WARNING: {len(report[key])} image(s) {key.replace('_', ' ')}: left out of the cache "
                  f"(names in report.json)", file=file)
    for key in ("duplicate_rows", "duplicate_list_entries", "duplicate_files"):
        if report.get(key):
            print(f"WARNING: {len(report[key])} {key.replace('_', ' ')}: each image taken once (the first of equal "
                  f"rows, the first file found; which ones: report.json)", file=file)
    if report.get("patients_in_two_splits"):
        print(f"WARNING: {len(report['patients_in_two_splits'])} patient(s) in two splits, as the table's split "
              f"says (names in report.json): the split is not patient-level", file=file)
    for x in report.get("nearly_uniform", [])[:5]:
        print(f"WARNING: {x['file']}: {x['warning']}", file=file)
    if len(report.get("nearly_uniform", [])) > 5:
        print(f"WARNING: {len(report['nearly_uniform'])} nearly uniform image(s) in all, kept in the cache (names "
              f"in report.json)", file=file)
