"""Labelled datasets from a table (data_prep.py csv), patients from paths (--patient-from), DICOM through
pydicom's modality and VOI LUT functions, and finetune.py on any labelled cache or mask cache.
Tiny images (20 px sources, 16-32 px caches), one thread."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_prep as dp

LABELS = ["No Finding", "Cardiomegaly", "Edema", "Pleural Effusion"]
VALUES = ["1.0", "0.0", "-1.0", ""]            # CheXpert: positive, negative, uncertain, not mentioned


def _make_chexpert(root, n_train=12, n_valid=3, seed=0):
    """A CheXpert-shaped download: CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyK/viewJ_{frontal,lateral}.jpg
    with train.csv / valid.csv (Path relative to the folder above CheXpert-v1.0-small, as in the release).
    Every patient has 2 studies (train) with a frontal and, for every other patient, a lateral view, so a split
    by file stem ("view1_frontal") would put one patient in every split. One listed image is missing, one image
    is in no table. Returns (src, {csv path: [row dicts]})."""
    rng = np.random.default_rng(seed)
    base = root / "CheXpert-v1.0-small"
    tables = {}
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS]
    pid = 0
    for split, n_pat, n_study in (("train", n_train, 2), ("valid", n_valid, 1)):
        rows = []
        for _ in range(n_pat):
            pid += 1
            for st in range(1, n_study + 1):
                views = [("view1_frontal", "Frontal")] + ([("view2_lateral", "Lateral")] if pid % 2 else [])
                for view, fl in views:
                    rel = f"CheXpert-v1.0-small/{split}/patient{pid:05d}/study{st}/{view}.jpg"
                    d = (root / rel).parent
                    d.mkdir(parents=True, exist_ok=True)
                    g = rng.integers(0, 256, (20, 20), dtype=np.uint8)
                    Image.fromarray(g).save(root / rel, quality=95)
                    vals = {lab: str(rng.choice(VALUES)) for lab in LABELS[1:]}
                    vals["No Finding"] = "1.0" if all(v in ("0.0", "") for v in vals.values()) else ""
                    rows.append({"Path": rel, "Sex": "F", "Age": "60", "Frontal/Lateral": fl,
                                 "AP/PA": "AP" if fl == "Frontal" else "", **vals})
        path = base / f"{split}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, header)
            w.writeheader()
            w.writerows(rows)
        tables[path] = rows
    missing = tables[base / "train.csv"][3]["Path"]
    (root / missing).unlink()
    extra = base / "train" / "patient99999" / "study1" / "view1_frontal.jpg"
    extra.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(extra)
    return base, tables, missing


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    src, tables, missing = _make_chexpert(root)
    out = root / "cache"
    dp.main(["csv", "--src", str(src), "--csv", str(src / "train.csv"), "--csv", f"test={src / 'valid.csv'}",
             "--image-col", "Path", "--label-cols", ",".join(LABELS), "--uncertain", "positive",
             "--keep-cols", "Frontal/Lateral", "--size", "16", "--workers", "1", "--out", str(out)])
    return dict(src=src, tables=tables, missing=missing, out=out)


def test_csv_chexpert_labels_policies_and_checks(chexpert):
    c = dp.open_cache(chexpert["out"])
    rows = {r["Path"]: (r, split) for p, rs in chexpert["tables"].items()
            for r in rs for split in ["test" if p.name == "valid.csv" else None]}
    assert c.meta["label_names"] == LABELS and c.meta["uncertain_policy"] == "positive"
    assert c.meta["label_kind"] == "multilabel" and c.meta["dataset"] == "cache"
    assert len(c) == len(rows) - 1                             # the missing file is left out
    for r in c.index:
        want, split = rows["CheXpert-v1.0-small/" + r["name"]]  # names are relative to --src
        assert r["labels"] == [l for l in LABELS if want[l] in ("1.0", "-1.0")]   # U-Ones
        assert r["uncertain"] == "|".join(l for l in LABELS if want[l] == "-1.0")
        assert r["Frontal/Lateral"] == want["Frontal/Lateral"]
        assert r["patient"] == r["name"].split("/")[1]          # patient00001, not the file stem
        if split:
            assert r["split"] == split
        img = np.asarray(Image.open(chexpert["src"] / r["name"]).convert("L").resize((16, 16), Image.BILINEAR))
        np.testing.assert_array_equal(c.images[r["i"]], img)
    rep = json.loads((chexpert["out"] / "report.json").read_text())
    assert rep["missing_files"] == [chexpert["missing"]]
    assert rep["not_in_csv_or_lists"] == ["train/patient99999/study1/view1_frontal.jpg"]
    assert rep["resolved_by_suffix"] == len(c)                 # the table's paths start above --src
    assert rep["patient_rule_counts"] == {"folder named like a patient (patient\\d+ or p\\d{8})": len(c)}
    assert rep["uncertain_counts"] and rep["converted"] == len(c)


def test_csv_split_is_by_patient(chexpert):
    c = dp.open_cache(chexpert["out"])
    splits = {}
    for r in c.index:
        splits.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())            # no patient in two splits
    assert {s for ss in splits.values() for s in ss} == {"train", "val", "test"}
    assert {p for p, s in splits.items() if s == {"test"}} == {"patient00013", "patient00014", "patient00015"}
    rep = json.loads((chexpert["out"] / "report.json").read_text())
    assert rep["patients_in_two_splits"] == [] and rep["patients"] == 15
    # the stem rule would have made 2 "patients" out of 15 (view1_frontal, view2_lateral)
    assert len({Path(r["name"]).stem for r in c.index}) == 2


def test_csv_uncertain_negative_blank_error_and_where(chexpert, tmp_path, capsys):
    src = chexpert["src"]
    out = tmp_path / "zeros"
    dp.main(["csv", "--src", str(src.parent), "--csv", str(src / "train.csv"), "--image-col", "Path",
             "--label-cols", ",".join(LABELS), "--where", "Frontal/Lateral=Frontal", "--size", "16",
             "--workers", "1", "--out", str(out)])
    c = dp.open_cache(out)
    train = {r["Path"]: r for r in chexpert["tables"][src / "train.csv"]}
    frontal = [p for p, r in train.items() if r["Frontal/Lateral"] == "Frontal" and p != chexpert["missing"]]
    assert sorted(r["name"] for r in c.index) == sorted(frontal)  # --src above the release folder: exact paths
    for r in c.index:
        assert r["labels"] == [l for l in LABELS if train[r["name"]][l] == "1.0"]   # U-Zeros
    rep = json.loads((out / "report.json").read_text())
    assert rep["rows_filtered_out"] == sum(r["Frontal/Lateral"] == "Lateral" for r in train.values())
    assert {r["split"] for r in c.index} == {"train", "val", "test"}   # no table split: test 0.2, val 0.1
    err = capsys.readouterr().err
    assert "patients: " in err and "folder named like a patient" in err
    with pytest.raises(SystemExit):                              # blank cells refused when asked to
        dp.main(["csv", "--src", str(src), "--csv", str(src / "train.csv"), "--image-col", "Path",
                 "--label-cols", ",".join(LABELS), "--blank", "error", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "train.csv line" in err and "blank label" in err and "Traceback" not in err


def test_csv_bad_tables_are_one_clear_line(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "src" / "a.png")
    table = tmp_path / "t.csv"
    table.write_text("image,Edema\na.png,2\n")
    for extra, want in ((["--label-cols", "Edema"], "line 2 column 'Edema': label value '2'"),
                        (["--label-cols", "Nodule"], "no column(s) ['Nodule']"),
                        (["--label-cols", "Edema", "--patient-from", "(a)(b)"], "exactly one group")):
        with pytest.raises(SystemExit):
            dp.main(["csv", "--src", str(tmp_path / "src"), "--csv", str(table), "--image-col", "image", *extra,
                     "--out", str(tmp_path / "out"), "--workers", "1"])
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_csv_long_format_vindr_style(tmp_path):
    """VinDr-CXR-like: bare ids + --image-path, one row per finding and reader, 'No finding', a patient column
    and a split column."""
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    ids = [f"img{k}" for k in range(6)]
    for k, i in enumerate(ids):
        Image.fromarray(np.full((20, 20), 10 * k, np.uint8)).save(src / "train" / f"{i}.png")
    rows = [("img0", "Nodule", "r1"), ("img0", "Cardiomegaly", "r2"), ("img0", "Nodule", "r3"),
            ("img1", "No finding", "r1"), ("img2", "Aortic enlargement", "r1"), ("img3", "No finding", "r2"),
            ("img4", "Nodule", "r1"), ("img5", "No finding", "r1")]
    with open(tmp_path / "ann.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "class_name", "rad_id", "pid", "fold"])
        for i, cls, rad in rows:
            k = int(i[3:])
            w.writerow([i, cls, rad, f"P{k // 2}", "test" if k >= 4 else "train"])
    out = tmp_path / "vindr"
    dp.main(["csv", "--src", str(src), "--csv", str(tmp_path / "ann.csv"), "--image-col", "image_id",
             "--image-path", "train/{}.png", "--label-col", "class_name", "--patient-col", "pid",
             "--split-col", "fold", "--size", "16", "--workers", "1", "--out", str(out)])
    c = dp.open_cache(out)
    assert c.meta["label_names"] == ["Aortic enlargement", "Cardiomegaly", "Nodule"]
    got = {r["name"]: (r["labels"], r["patient"], r["split"]) for r in c.index}
    assert got["train/img0.png"] == (["Cardiomegaly", "Nodule"], "P0", "train")
    assert got["train/img1.png"] == ([], "P0", "train")
    assert got["train/img4.png"] == (["Nodule"], "P2", "test")
    assert "uncertain" not in c.index[0]
    np.testing.assert_array_equal(c.label_matrix()[[r["i"] for r in c.index if r["name"] == "train/img0.png"]],
                                  [[0, 1, 1]])


def test_folder_patient_from(tmp_path, capsys):
    src = tmp_path / "tree"
    for p in ("patient00001/study1", "patient00001/study2", "patient00002/study1"):
        (src / "train" / p).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "train" / p / "view1_frontal.png")
    cases = {"auto": {"patient00001", "patient00002"}, "stem": {"view1_frontal"},
             "up:2": {"train/patient00001", "train/patient00002"}, "(patient\\d+)/study": {"patient00001", "patient00002"}}
    for spec, want in cases.items():
        out = tmp_path / spec.replace("/", "_").replace("\\", "").replace("(", "").replace(")", "").replace(":", "")
        dp.main(["folder", "--src", str(src), "--patient-from", spec, "--size", "8", "--workers", "1",
                 "--out", str(out)])
        assert {r["patient"] for r in dp.open_cache(out).index} == want, spec
        assert f"by --patient-from {spec}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dp.main(["folder", "--src", str(src), "--patient-from", "up:5", "--out", str(tmp_path / "bad"),
                 "--workers", "1"])
    err = capsys.readouterr().err
    assert "needs 5 folder(s) above the file" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------
# DICOM: pydicom's modality LUT and VOI LUT functions, on pydicom-data files that carry LUTs

def _pydicom_grey(ds, lo, hi):
    """The reference: pydicom's own functions, the output range [lo, hi] to 0..255, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    v = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    g = np.rint(np.clip((v - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    return 255 - g if ds.PhotometricInterpretation == "MONOCHROME1" else g


def test_dicom_voi_lut_sequence_matches_pydicom(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    path = get_testdata_file("vlut_04.dcm")                   # 8-bit image, VOI LUT Sequence of 16-bit entries
    ds = pydicom.dcmread(path)
    assert "VOILUTSequence" in ds and ds.VOILUTSequence[0].LUTDescriptor[2] == 16
    got, _ = dp.dicom_to_grey(path)
    np.testing.assert_array_equal(np.asarray(got), _pydicom_grey(pydicom.dcmread(path), 0, 65535))
    # that file's LUT is a straight line; bend it (a gamma curve) so that ignoring the LUT would fail
    ds.VOILUTSequence[0].LUTData = [int(round(65535 * (j / 255) ** 2.5)) for j in range(256)]
    bent = tmp_path / "vlut_gamma.dcm"
    ds.save_as(bent)
    got = np.asarray(dp.dicom_to_grey(bent)[0])
    want = np.rint(255 * (pydicom.dcmread(bent).pixel_array / 255.0) ** 2.5)
    np.testing.assert_allclose(got, want, atol=1)              # 16-bit LUT entries rounded once more to 8 bits
    np.testing.assert_array_equal(got, _pydicom_grey(pydicom.dcmread(bent), 0, 65535))
    assert np.abs(got.astype(int) - pydicom.dcmread(bent).pixel_array).max() > 50


def test_dicom_modality_lut_sequence_then_window_or_percentile(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut
    path = get_testdata_file("mlut_18.dcm")                   # signed 12-bit, Modality LUT Sequence, no VOI
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds and "WindowCenter" not in ds and "VOILUTSequence" not in ds
    ds.ModalityLUTSequence[0].LUTData = [int(round(65535 * (j / 4095) ** 0.5)) for j in range(4096)]
    bent = tmp_path / "mlut_sqrt.dcm"
    ds.save_as(bent)
    m = apply_modality_lut(pydicom.dcmread(bent).pixel_array, pydicom.dcmread(bent)).astype(np.float64)
    lo, hi = np.percentile(m, [1, 99])                         # no VOI: the percentile fallback, after the LUT
    want = np.rint(np.clip((m - lo) / (hi - lo), 0, 1) * 255)
    np.testing.assert_array_equal(np.asarray(dp.dicom_to_grey(bent)[0]), want)
    ds.WindowCenter, ds.WindowWidth = 30000, 20000             # a window on the LUT's output (0 .. 2^16 - 1)
    ds.save_as(bent)
    np.testing.assert_array_equal(np.asarray(dp.dicom_to_grey(bent)[0]), _pydicom_grey(pydicom.dcmread(bent), 0, 65535))
    assert dp.voi_output_range(pydicom.dcmread(bent)) == (0.0, 65535.0)


def test_dicom_sigmoid_rescale_monochrome1(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    import pydicom.data
    path = Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/77654033/CR1/6154"  # 16x16 CR, MONOCHROME1
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and float(ds.RescaleSlope) != 1
    lo, hi = 200.0, (2 ** ds.BitsStored - 1) * float(ds.RescaleSlope) + 200.0   # unsigned, rescaled (intercept 200)
    assert float(ds.RescaleIntercept) == 200 and dp.voi_output_range(ds) == pytest.approx((lo, hi))
    ds.WindowCenter, ds.WindowWidth = 1800, 400
    results = {}
    for func in ("LINEAR", "SIGMOID"):
        ds.VOILUTFunction = func
        f = tmp_path / f"{func}.dcm"
        ds.save_as(f)
        got = np.asarray(dp.dicom_to_grey(f)[0])
        np.testing.assert_array_equal(got, _pydicom_grey(pydicom.dcmread(f), lo, hi))
        results[func] = got
    assert np.abs(results["LINEAR"].astype(int) - results["SIGMOID"]).max() > 10   # the function matters
    # MONOCHROME1: more attenuation (higher stored value) must come out darker
    raw = pydicom.dcmread(f).pixel_array.ravel()
    out = results["SIGMOID"].ravel()[np.argsort(raw, kind="stable")].astype(int)
    assert (np.diff(out) <= 0).all() and out[0] - out[-1] > 100
    # --dicom-window percentile ignores the header window
    from pydicom.pixels import apply_modality_lut
    m = apply_modality_lut(pydicom.dcmread(f).pixel_array, pydicom.dcmread(f)).astype(np.float64)
    p1, p99 = np.percentile(m, [1, 99])
    want = 255 - np.rint(np.clip((m - p1) / (p99 - p1), 0, 1) * 255)
    np.testing.assert_array_equal(np.asarray(dp.dicom_to_grey(f, window="percentile")[0]), want)


# ----------------------------------------------------------------------------------------------------
# finetune.py on any labelled cache, and segmentation from any cache with masks

@pytest.mark.slow
def test_finetune_multilabel_on_csv_cache(chexpert, tmp_path, one_thread):
    import finetune
    out = tmp_path / "ft"
    summary = finetune.main(["--task", "multilabel", "--data-root", str(chexpert["out"]), "--init", "random",
                             "--arch", "resnet18", "--img-size", "32", "--epochs", "2", "--batch-size", "8",
                             "--min-iters", "1", "--device", "cpu", "--workers", "0", "--save", "none",
                             "--out", str(out)])
    (r,) = summary["records"]
    c = dp.open_cache(chexpert["out"])
    assert r["task"] == "multilabel" and r["metric"] == "auc" and list(r["per_class"]) == LABELS
    assert r["n_train"] == len(c.rows("train")) and r["n_test"] == len(c.rows("test"))
    defined = [a for a in r["per_class"].values() if a is not None]
    assert defined and r["value"] == pytest.approx(100 * np.mean(defined))
    assert "## multilabel: auc" in (out / "results.md").read_text()


@pytest.mark.slow
def test_finetune_segmentation_from_any_mask_cache(phantom_root, tmp_path, one_thread):
    import finetune
    c = dp.open_cache(phantom_root)
    rows = c.rows("train")[:2]
    # scr-lungs (JSRT/SCR's lung masks) and the generic seg: form read the same structures of any mask cache
    for task in ("scr-lungs", "seg:left_lung,right_lung"):
        finetune.resolve_task(task)                        # what finetune.main does with --task
        ds = finetune.CacheDataset(c, rows, task, 64, "val")
        _, m = ds[0]
        want = c.masks[rows[0], [c.meta["structures"].index("left_lung"), c.meta["structures"].index("right_lung")]]
        np.testing.assert_array_equal(m[0].numpy(), want.max(0))          # the union of both lungs
    summary = finetune.main(["--task", "seg:heart", "--data-root", str(phantom_root), "--init", "random",
                             "--arch", "resnet18", "--img-size", "32", "--shots", "3", "--epochs", "1",
                             "--batch-size", "3", "--min-iters", "1", "--device", "cpu", "--workers", "0",
                             "--save", "none", "--out", str(tmp_path / "seg")])
    (r,) = summary["records"]
    assert r["metric"] == "dice" and 0 <= r["value"] <= 100 and r["task"] == "seg:heart"
    with pytest.raises(ValueError, match=r"needs masks \('aorta',\)"):
        finetune.open_task_cache("seg:aorta", phantom_root)
    with pytest.raises(SystemExit):
        finetune.get_args(["--task", "multilabel"])                # generic tasks need --data-root
