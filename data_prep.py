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

Every command writes one cache folder, built in a hidden temporary folder and renamed into place when complete;
docs/data.md has the format, the datasets and the checks of bad input. This file is the command line; the pieces
sit in adam_cxr/, each importing only those listed above it:
    safe_files  locks, room checks, fsync, files and folders written atomically
    decode      read_image, the one image reader: PNG / JPEG / DICOM / JSRT
    caches      the cache format: open_cache, write_index, publish, measure_read_speed
    phantom     the procedural phantom
    open_data   open_dataset / open_images: how every script finds its images
    convert     the conversion engine (worker processes, report)
    scanners    per-dataset scanners (chestxray14, eyepacs, jsrt, folder), patient rules and splits
    tables      the table converter (csv)
`import data_prep` keeps the names the scripts use (open_dataset, open_images, read_image, DataError, ...).

Import cost: numpy + pillow only; pydicom is imported when a DICOM file is met, tqdm when a conversion starts.
"""
import argparse
import functools
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

# What the commands use, and the names `import data_prep` offers the scripts (tests patch a name in adam_cxr).
from adam_cxr.caches import DEFAULT_SIZE, KILL_AFTER_ENV, STRUCTURES, DataError, measure_read_speed, open_cache  # noqa
from adam_cxr.convert import convert, print_report, print_warnings
from adam_cxr.decode import dicom_to_grey, jsrt_to_grey, read_image, voi_output_range  # noqa: F401
from adam_cxr.open_data import CacheImages, FolderImages, dataset_root, open_dataset, open_images  # noqa: F401
from adam_cxr.phantom import (LANDMARKS, PHANTOM_LABELS, PHANTOM_VERSION, build_phantom, ensure_phantom,  # noqa: F401
                              phantom_sample)
from adam_cxr.safe_files import TMP_FOLDER, DiskFull, FolderLock  # noqa: F401
from adam_cxr.scanners import (CXR14_LABELS, CXR14_TRAIN, CXR14_VAL, PATIENT_FROM_HELP, SCR_FOLDERS,  # noqa: F401
                               chestxray14_items, eyepacs_items, folder_items, jsrt_items, patient_split)
from adam_cxr.tables import SPLIT_NAMES, csv_items

CORES = os.cpu_count() or 1
BOUNDS = {"size": (8, None), "num_images": (1, None), "limit": (1, None), "n": (1, None), "seed": (0, None),
          "val_seed": (0, None), "split_seed": (0, None), "workers": (1, 4 * CORES)}   # integer flags: (lowest, highest)


# ----------------------------------------------------------------------------------------------------
# Argument groups: each adds one concern's flags to a command

def output_flags(p, name):
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
    if name == "jsrt":
        g.add_argument("--masks", type=Path, default=None,
                       help="SCR root; searched recursively for <image>.gif under folders named heart, "
                            "left clavicle, right clavicle, left lung, right lung")
    p.add_argument("--workers", type=int, default=CORES,
                   help="decoding processes (default: all cores); 1 = in-process, easiest to debug")


def phantom_flags(p, name):
    g = p.add_argument_group("the phantom")
    g.add_argument("--num-images", type=int, default=1000, help="how many phantoms (split 70/10/20)")
    g.add_argument("--seed", type=int, default=0, help="the phantom set is a pure function of the seed")


def image_flags(p, name):
    g = p.add_argument_group("reading the images")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable / truncated files and list them in report.json instead of failing")
    g.add_argument("--fit", choices=["pad", "crop", "stretch"], default="crop" if name == "eyepacs" else "pad",
                   help="non-square images: pad to a black square (keeps all anatomy; default), take the "
                        "centred square (default for eyepacs: the retina fills the height) or stretch")
    g.add_argument("--limit", type=int, default=None,
                   help="convert only the first N images (sorted by name; splits as for the full set): "
                        "a quick trial of the whole command before the long run")
    if name in ("folder", "csv"):
        g.add_argument("--channels", type=int, choices=[1, 3], default=1, help="1 grey (X-rays) or 3 RGB")
        g.add_argument("--dicom-window", choices=["header", "percentile"], default="header",
                       help="DICOM grey window: header = the file's VOI LUT or window (pydicom's apply_voi_lut), "
                            "or its 1st..99th percentiles when it has none; percentile = always the percentiles "
                            "(use it when the header window spans the whole range and images look flat)")


def split_flags(p, name):
    g = p.add_argument_group("patients and splits")
    if name in ("folder", "csv"):
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


def _comma_list(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def _columns(s):
    """A comma list of column names, at least one, each once."""
    names = _comma_list(s)
    twice = [n for n in dict.fromkeys(names) if names.count(n) > 1]
    if not names or twice:
        raise argparse.ArgumentTypeError(f"{s!r}: " + (f"{twice[0]!r} is given twice" if twice else "no column names"))
    return names


def _image_path(s):
    """--image-path: a path with {} where the image column's value goes."""
    try:
        ok = "\0" in s.format("\0")
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a path with {{}} where the column's value goes, e.g. "
                                         f"'train/{{}}.dicom'")
    return s


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


def table_flags(p, name):
    t = p.add_argument_group("the table")
    t.add_argument("--csv", action="append", required=True, type=_csv_arg, metavar="[SPLIT=]FILE",
                   help="the label table; repeatable (rows of several tables are merged); SPLIT=FILE gives every "
                        "row of FILE that split (train, val or test), e.g. --csv train.csv --csv test=valid.csv "
                        "for CheXpert")
    t.add_argument("--image-col", required=True, help="column naming the image, a path relative to --src "
                   "(leading folders that --src already is are dropped; e.g. CheXpert's Path)")
    t.add_argument("--image-path", default="{}", type=_image_path, help="turns the image column into a path, e.g. "
                   "'train/{}.dicom' when the column holds bare ids (VinDr-CXR's image_id)")
    lab = t.add_mutually_exclusive_group(required=True)
    lab.add_argument("--label-cols", type=_columns, default=[],
                     help="comma list of label columns, one per label, values 1 / 0 / -1 (uncertain) / blank (not "
                          "mentioned), as in CheXpert and MIMIC-CXR's chexpert.csv")
    lab.add_argument("--label-col", default=None,
                     help="one column of label names ('|'-separated); several rows of one image are merged "
                          "(VinDr-CXR's annotations: class_name)")
    t.add_argument("--no-label", type=_comma_list, default=["No Finding", "No finding"],
                   help="with --label-col: names that mean no label")
    t.add_argument("--uncertain", choices=["negative", "positive"], default="negative",
                   help="with --label-cols: what -1 (uncertain) becomes: negative = CheXpert's U-Zeros, positive = "
                        "U-Ones (Irvin et al. 2019). Either way index.csv's 'uncertain' column lists them, so no "
                        "information is lost")
    t.add_argument("--blank", choices=["negative", "error"], default="negative",
                   help="with --label-cols: a blank cell (label not mentioned) is negative, or an error")
    t.add_argument("--patient-col", default=None,
                   help="column naming the patient (e.g. MIMIC's subject_id); default: --patient-from")
    t.add_argument("--split-col", default=None, help="column with train / val (valid, validation, dev) / test; "
                   "default: the file's SPLIT= or a patient-level split")
    t.add_argument("--val-fraction", type=float, default=None,
                   help="patient-level split of rows without a split: this fraction of images to val "
                        "(default 0.1; 0 when a table already gives val rows)")
    t.add_argument("--test-fraction", type=float, default=None,
                   help="the same for test (default 0.2; 0 when a table already gives test rows)")
    t.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split")
    t.add_argument("--keep-cols", type=_columns, default=[],
                   help="more columns copied into index.csv (e.g. 'Frontal/Lateral,AP/PA,Sex,Age')")
    t.add_argument("--where", action="append", type=_where_arg, default=[], metavar="COL=VALUE",
                   help="keep only rows whose COL is VALUE (repeatable), e.g. 'Frontal/Lateral=Frontal'; the report "
                        "counts the rows left out")


def speed_flags(p, name):
    p.add_argument("--cache", type=Path, required=True, help="a prepared cache folder")
    p.add_argument("--n", type=int, default=200, help="random rows to read")


# ----------------------------------------------------------------------------------------------------
# Scans: the command's flags -> (items, archives, report, convert() keywords)

def scan_chestxray14(args):
    items, archives, report = chestxray14_items(args.src, args.val_seed, args.train_list, args.val_list)
    return items, archives, report, dict(channels=1, label_names=CXR14_LABELS, extra_cols=["view"])


def scan_eyepacs(args):
    items, report = eyepacs_items(args.src, seed=args.val_seed)
    return items, (), report, dict(channels=3, label_names=[f"grade{k}" for k in range(5)], extra_cols=["level"])


def scan_jsrt(args):
    items, report = jsrt_items(args.src, args.masks)
    return items, (), report, dict(channels=1, label_names=["nodule"], structures=STRUCTURES if args.masks else ())


def scan_folder(args):
    items, report = folder_items(args.src, args.patient_from)
    if args.val_fraction > 0:
        val = patient_split(Counter(it["patient"] for it in items), args.val_fraction)
        for it in items:
            it["split"] = "val" if it["patient"] in val else "train"
    return items, (), report, dict(channels=args.channels, label_names=[], dicom_window=args.dicom_window)


def scan_csv(args):
    items, report, label_names = csv_items(
        args.src, args.csv, args.image_col, label_cols=args.label_cols, label_col=args.label_col,
        no_label=args.no_label, patient_col=args.patient_col, patient_from=args.patient_from,
        split_col=args.split_col, uncertain=args.uncertain, blank=args.blank, image_path=args.image_path,
        keep_cols=args.keep_cols, where=args.where, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.split_seed)
    return items, (), report, dict(
        channels=args.channels, label_names=label_names, dicom_window=args.dicom_window,
        extra_cols=[*args.keep_cols, "uncertain"] if args.label_cols else list(args.keep_cols),
        extra_meta=dict(label_kind="multilabel", uncertain_policy=report["uncertain_policy"],
                        blank_policy=report["blank_policy"]))


# ----------------------------------------------------------------------------------------------------
# The commands

def fail(e, out=None):
    """A bad input, a full disk, an output in use: one line on stderr and exit status 1, no traceback."""
    print(f"error: {e}" + (f"\nnothing was written to {out}" if out else ""), file=sys.stderr)
    sys.exit(1)


def run_phantom(args, out):
    t0 = time.time()
    try:
        build_phantom(out, args.num_images, args.size, args.seed, workers=args.workers, force=args.force)
    except OSError as e:                               # exists, in use, disk full: one clear line
        fail(e)
    print(f"wrote {out}: {args.num_images} phantoms at {args.size}px in {time.time() - t0:.1f}s", file=sys.stderr)
    return out


def run_conversion(scan, args, out):
    t0 = time.time()
    try:
        items, archives, report, kw = scan(args)
    except (OSError, ValueError, DataError) as e:      # missing CSV / list, malformed CSV: one clear line
        fail(e, out)
    if args.limit is not None:
        items = items[:args.limit]
        report["limit"] = args.limit
    print(f"{args.dataset}: {len(items)} images to convert from {args.src}", file=sys.stderr)
    if report.get("patient_rule_counts"):
        print(f"patients: {report['patients']} by --patient-from {report['patient_from']}: "
              + ", ".join(f"{n} image(s) by {how}" for how, n in report["patient_rule_counts"].items()), file=sys.stderr)
    try:
        out, report = convert(items, out, dataset=out.name if args.dataset == "csv" else args.dataset, report=report,
                              archives=archives, size=args.size, fit=args.fit, skip_bad=args.skip_bad,
                              workers=args.workers, force=args.force, source=str(args.src.resolve()), **kw)
    except (RuntimeError, ValueError, OSError) as e:   # bad file, exists, in use, disk full
        print_report(report)
        fail(e, out)
    print_report(report)
    print_warnings(report)
    print(f"wrote {out} ({report['converted']} images, {args.size}px) in {time.time() - t0:.1f}s; "
          f"details in {out / 'report.json'}", file=sys.stderr)
    return out


def run_speed(args, out):
    try:
        r = measure_read_speed(args.cache, args.n)
    except (OSError, ValueError) as e:                 # no cache there, or a broken one: one clear line
        fail(f"--cache {args.cache}: {e}")
    print(json.dumps(r))
    return r


COMMANDS = {  # name: (help, argument groups, what it runs)
    "phantom": ("procedural chest radiographs with masks, landmarks and findings (no download)",
                (output_flags, phantom_flags), run_phantom),
    "chestxray14": ("NIH ChestX-ray14: images/ or images_0NN/images/ folders or the .tar.gz archives, plus "
                    "Data_Entry_2017(_v2020).csv, train_val_list.txt, test_list.txt",
                    (output_flags, image_flags, split_flags), functools.partial(run_conversion, scan_chestxray14)),
    "eyepacs": ("Kaggle EyePACS: train/*.jpeg + trainLabels.csv (optional test/ + retinopathy_solution.csv)",
                (output_flags, image_flags, split_flags), functools.partial(run_conversion, scan_eyepacs)),
    "jsrt": ("JSRT .IMG radiographs (+ SCR masks via --masks) for segmentation",
             (output_flags, image_flags, split_flags), functools.partial(run_conversion, scan_jsrt)),
    "folder": ("any folder of PNG / JPEG / DICOM images (recursive), unlabelled",
               (output_flags, image_flags, split_flags), functools.partial(run_conversion, scan_folder)),
    "csv": ("any labelled dataset shipped as images plus a table (CheXpert, VinDr-CXR, MIMIC-CXR-JPG, in-house): "
            "labels per image, patient-level split, the same checks and report",
            (output_flags, image_flags, split_flags, table_flags), functools.partial(run_conversion, scan_csv)),
    "speed": ("images/s of cache reads vs PNG decoding (one core)", (speed_flags,), run_speed),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See docs/data.md.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="dataset", required=True)
    for name, (help, groups, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        for add in groups:
            add(p, name)
    args = ap.parse_args(argv)
    for flag, (low, high) in BOUNDS.items():
        v = getattr(args, flag, None)
        if v is not None and (v < low or high is not None and v > high):
            ap.error(f"--{flag.replace('_', '-')} {v}: must be " + (f">= {low}" if v < low else
                     f"<= {high} (4 processes per core; more only compete for this machine's {CORES} core(s))"))
    fractions = {f: getattr(args, f, None) for f in ("val_fraction", "test_fraction")}
    for flag, v in fractions.items():
        if v is not None and not 0 <= v < 1:                     # nan too
            ap.error(f"--{flag.replace('_', '-')} {v}: must be a fraction in [0, 1) of the images")
    if sum(v or 0 for v in fractions.values()) >= 1:
        ap.error(f"--val-fraction {fractions['val_fraction']} and --test-fraction {fractions['test_fraction']} "
                 f"leave no image for train: their sum must be below 1")
    own = {"i", "name", "patient", "split", "labels", *(["uncertain"] if getattr(args, "label_cols", None) else [])}
    for c in getattr(args, "keep_cols", []):
        if c in own:
            ap.error(f"--keep-cols {c}: index.csv has its own {c!r} column, which the table's would shadow; "
                     f"rename that column of the table, or leave it out")
    if (getattr(args, "train_list", None) is None) != (getattr(args, "val_list", None) is None):
        ap.error("--train-list and --val-list go together: give both, or neither for our patient-level split")
    for flag in ("src", "masks"):
        if getattr(args, flag, None) is not None and not getattr(args, flag).is_dir():
            ap.error(f"--{flag} {getattr(args, flag)} is not a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = getattr(args, "out", None) or Path("data") / args.dataset
    return COMMANDS[args.dataset][2](args, out)


def stopped(signum, frame):
    """SIGTERM (`kill`) unwinds like Ctrl-C, so that the writer removes its temporary folder."""
    raise KeyboardInterrupt(signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stopped)
    try:
        main()
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"\nerror: stopped by {signal.Signals(signum).name}: nothing was written (the temporary folder is "
              f"removed); run the same command again", file=sys.stderr)
        sys.exit(128 + signum)
