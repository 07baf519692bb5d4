"""The table converter: any labelled dataset shipped as images plus a table (CheXpert, VinDr-CXR, MIMIC-CXR-JPG,
in-house) -> items and a report for adam_cxr/convert.py (`python data_prep.py csv`).

Labels wide (one column per label: 1 / 0 / -1 uncertain / blank) or long (a column of label names, rows of one
image merged); the patient from a column or from the path (adam_cxr.scanners.patient_rule); the split from a
column, from the table's file, or by patient; every row checked, the first fault an error naming file and line.
"""
from collections import Counter
from pathlib import Path

from adam_cxr.open_data import walk
from adam_cxr.scanners import IMAGE_EXTS, apply_patients, patient_rule, patient_split, read_table

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
    found = walk(src, IMAGE_EXTS)
    resolve = _resolver(found)
    wide = bool(label_cols)
    rows, order, dup_rows, filtered, line_of = {}, [], [], 0, {}
    for path, file_split in csvs:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--csv {path}: no such file")
        need = [image_col, *label_cols, *([label_col] if label_col else []), *([patient_col] if patient_col else []),
                *([split_col] if split_col else []), *keep_cols, *(w[0] for w in where)]
        _, table = read_table(path, need)
        for line, r in table:
            at = f"{path} line {line}"
            if any(r[c].strip() != v for c, v in where):
                filtered += 1
                continue
            cell = r[image_col].strip()
            if not cell:
                raise ValueError(f"{at}: empty {image_col!r}")
            name = image_path.format(cell)
            if wide:
                pos, unc = [], []
                for c in label_cols:
                    p, u = _label_value(r[c], uncertain, blank, f"{at} column {c!r}")
                    pos += [c] * p
                    unc += [c] * u
            else:
                names = [x.strip() for x in r[label_col].split("|")]
                pos, unc = sorted({x for x in names if x and x not in no_label}), []
            split = file_split
            if split_col:
                v = r[split_col].strip().lower()
                if v not in SPLIT_NAMES:
                    raise ValueError(f"{at}: {split_col!r} is {r[split_col]!r}; expected one of {sorted(SPLIT_NAMES)}")
                split = SPLIT_NAMES[v]
            rec = dict(labels=pos, uncertain=unc, split=split,
                       patient=r[patient_col].strip() if patient_col else None,
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
        apply_patients(items, patient_from, report)
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
