"""Per-dataset scanners: a downloaded tree -> items (one dict per image: name, patient, split, labels, where its
file is) and a report of what was found, expected, missing and repeated; adam_cxr/convert.py then writes the cache.

    chestxray14_items   NIH ChestX-ray14: folders or .tar.gz archives, the label CSV, the authors' split lists
    eyepacs_items       Kaggle EyePACS: JPEGs + trainLabels.csv, split by patient
    jsrt_items          JSRT .IMG radiographs + SCR masks, SCR's folds
    folder_items        any folder of PNG / JPEG / DICOM images, the patient by --patient-from (patient_rule)

The split is always by patient (patient_split), so that no patient has images on both sides.
"""
import csv
import hashlib
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np

from adam_cxr.caches import STRUCTURES
from adam_cxr.open_data import plain_images, walk

CXR14_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]
CXR14_TRAIN, CXR14_VAL = 75312, 11212          # the authors' split of train_val_list.txt (docs/METHOD.md §5)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


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


def _find(found, names, src, what):
    """The file among `found` (relative paths) whose base name is the first of `names` present."""
    for n in names:
        hits = [p for rel, p in found.items() if rel.rsplit("/", 1)[-1] == n]
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{what}: none of {names} found under {src}")


def _read_list(path):
    return [l.strip() for l in read_text(path).splitlines() if l.strip()]


def _repeats(names, where):
    """'WHERE: NAME' for each name given more than once (kept once, and reported: duplicate_* in report.json)."""
    return [f"{where}: {n}" for n, c in Counter(names).items() if c > 1]


def read_text(path):
    """A table or list as text: UTF-8, a byte-order mark dropped. ValueError naming the file and line where it is not
    UTF-8 (a table a spreadsheet saved as Latin-1 or UTF-16)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: byte {data[e.start]:#04x} is not UTF-8 text; save the file as UTF-8 "
                         f"('CSV UTF-8' in a spreadsheet)") from None


def need_columns(path, header, need):
    """ValueError naming the columns a table lacks or names twice (which of the two would be read?). A header read
    as one column that holds ';', a tab or '|' means the file has another separator, and the message says so."""
    lacking = [c for c in need if c not in header]
    if lacking:
        sep = next((c for c in (";", "\t", "|") if len(header) == 1 and c in header[0]), None)
        said = f"it is separated by {sep!r}: save it comma-separated" if sep else f"its columns are {header}"
        raise ValueError(f"{path}: no column(s) {lacking}; {said}")
    for c in dict.fromkeys(need):
        at = [j + 1 for j, h in enumerate(header) if h == c]
        if len(at) > 1:
            raise ValueError(f"{path}: the header names {c!r} {len(at)} times (columns {', '.join(map(str, at))}); "
                             f"rename the copies so that one column is {c!r}")


def read_table(path, need):
    """A CSV table -> (header, rows): rows yields (line, {column: value}), blank lines skipped. ValueError naming the
    file and line for text that is not UTF-8, a column of `need` missing or named twice, and a row with more or
    fewer fields than the header: an unquoted comma in a value shifts every value after it, and a short row would
    read as blank cells."""
    rd = csv.reader(io.StringIO(read_text(path), newline=""))
    header = next(rd, [])
    need_columns(path, header, need)

    def rows():
        for row in rd:
            if not row:
                continue
            if len(row) != len(header):
                why = ("a value holding a comma must be quoted, or every value after it moves one column" if
                       len(row) > len(header) else "a short row would read as blank cells; complete it or remove it")
                raise ValueError(f"{path} line {rd.line_num}: {len(row)} field(s), the header has {len(header)}: "
                                 f"{why}")
            yield rd.line_num, dict(zip(header, row))
    return header, rows()


def split_lists(train_list, val_list, csv_rows, train_val, test):
    """--train-list / --val-list -> {name: "train" or "val"}: one image a line, its name first (further columns, such
    as the labels of the authors' Xray14_train_official.txt, are ignored). Checked, the first fault an error naming
    the file, line and image: every name is an image of the label CSV and of train_val_list.txt (not test_list.txt),
    listed once, in one list only, and no patient has images in both lists."""
    split_of, first_of_patient = {}, {}
    for flag, path, split in (("--train-list", train_list, "train"), ("--val-list", val_list, "val")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
        for line_no, line in enumerate(read_text(path).splitlines(), 1):
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
    found = walk(src, (".png", ".csv", ".txt", ".tar.gz", ".tgz", ".tar"))
    entry = _find(found, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"], src, "ChestX-ray14 label CSV")
    train_val = _read_list(_find(found, ["train_val_list.txt"], src, "ChestX-ray14 split list"))
    test = _read_list(_find(found, ["test_list.txt"], src, "ChestX-ray14 split list"))
    pngs, dup = {}, []
    for rel, p in found.items():
        if rel.endswith(".png"):
            (dup.append(rel) if p.name in pngs else pngs.__setitem__(p.name, p))
    archives = [p for rel, p in found.items() if rel.endswith((".tar.gz", ".tgz", ".tar"))]
    csv_rows, line_of, dup_rows = {}, {}, []
    rd = csv.reader(io.StringIO(read_text(entry), newline=""))
    header = next(rd, [])
    need_columns(entry, header, ["Image Index", "Finding Labels"])
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
    found = walk(src, (".jpeg", ".jpg", ".png", ".csv"))
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
        _, table = read_table(path, ["image", "level"])
        for line, r in table:
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
    imgs = {p.stem.upper(): p for p in walk(src, (".img",)).values()}
    masks, fold = {}, {}
    if masks_dir is not None:
        for rel, p in walk(Path(masks_dir), (".gif", ".png")).items():
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


def apply_patients(items, spec, report):
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
    apply_patients(items, patient_from, report)
    return items, report
