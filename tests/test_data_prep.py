"""Tests of data_prep.py: fake downloads of every dataset, converted and compared with PIL-computed expectations;
bad files, interrupted runs, splits, the phantom's ground truth. Runtime budget: 60 s on 2 cores."""
import ast
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data_prep as dp
from helpers import CXR14_SIDE, ROOT, make_cxr14

SIZE = 24  # the fake ChestX-ray14 images (CXR14_SIDE = 40 px) cached at 24x24: a real resize


# ----------------------------------------------------------------------------------------------------
# Fake ChestX-ray14 download (helpers.make_cxr14)

def _expected_grey(data, size):
    """The documented recipe: PIL convert('L'), then resize BILINEAR."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def cxr14(tmp_path_factory):
    base = tmp_path_factory.mktemp("cxr14")
    return {lay: make_cxr14(base / lay, lay) for lay in ("flat", "nested", "tar")}


@pytest.mark.slow
@pytest.mark.parametrize("layout,workers", [("flat", 1), ("nested", 2), ("tar", 2)])
def test_chestxray14_layouts(cxr14, tmp_path, layout, workers):
    fake = cxr14[layout]
    out = tmp_path / "chestxray14"
    dp.main(["chestxray14", "--src", str(fake["root"]), "--out", str(out), "--size", str(SIZE), "--skip-bad",
             "--workers", str(workers)])
    c = dp.open_cache(out)
    recs = {n: (p, labs) for n, p, labs in fake["recs"]}
    good = sorted(n for n in recs if n not in (fake["truncated"], fake["not_in_csv"]))
    assert [r["name"] for r in c.index] == good
    assert c.images.shape == (len(good), SIZE, SIZE) and c.images.dtype == np.uint8
    assert c.meta["label_names"] == dp.CXR14_LABELS and c.meta["channels"] == 1 and c.masks is None
    for r in c.index:
        np.testing.assert_array_equal(c.images[r["i"]], _expected_grey(fake["files"][r["name"]], SIZE),
                                      err_msg=r["name"])
        assert r["labels"] == recs[r["name"]][1] and r["patient"] == recs[r["name"]][0]
        assert (r["split"] == "test") == (r["name"] in fake["test"])
        assert r["view"] == "PA"
    splits = {}
    for r in c.index:
        splits.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()), "a patient is in two splits"
    assert {"train", "val", "test"} <= {r["split"] for r in c.index}
    rep = json.loads((out / "report.json").read_text())
    assert [b["name"] for b in rep["bad"]] == [fake["truncated"]] and fake["truncated"] in rep["bad"][0]["file"]
    assert rep["listed_but_not_in_csv"] == [fake["not_in_csv"]]
    assert any(fake["not_in_csv"] in x for x in rep["not_in_csv_or_lists"])
    assert rep["source_modes"].get("RGBA", 0) > 0 and rep["source_sizes"] == {f"{CXR14_SIDE}x{CXR14_SIDE}": len(good)}


@pytest.mark.slow
def test_chestxray14_same_split_every_layout_and_run(cxr14, tmp_path):
    idx = []
    for lay in ("flat", "tar"):
        out = tmp_path / lay
        dp.main(["chestxray14", "--src", str(cxr14[lay]["root"]), "--out", str(out), "--size", "16", "--skip-bad",
                 "--workers", "1"])
        idx.append([(r["name"], r["split"]) for r in dp.open_cache(out).index])
    assert idx[0] == idx[1]
    out = tmp_path / "limited"                                     # --limit: a prefix, same splits
    dp.main(["chestxray14", "--src", str(cxr14["tar"]["root"]), "--out", str(out), "--size", "16", "--skip-bad",
             "--workers", "1", "--limit", "8"])
    got = [(r["name"], r["split"]) for r in dp.open_cache(out).index]
    assert len(got) >= 6 and set(got) <= set(idx[0])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nested", "tar"])
def test_chestxray14_truncated_file_is_an_error_naming_it(cxr14, tmp_path, capsys, layout):
    out = tmp_path / "chestxray14"
    with pytest.raises(SystemExit) as e:
        dp.main(["chestxray14", "--src", str(cxr14[layout]["root"]), "--out", str(out), "--size", "16",
                 "--workers", "1"])
    assert e.value.code == 1
    assert cxr14[layout]["truncated"] in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [], "half-written output left behind"


@pytest.mark.slow
def test_interrupted_run_leaves_no_loadable_cache(cxr14, tmp_path):
    out = tmp_path / "chestxray14"
    cmd = [sys.executable, str(ROOT / "data_prep.py"), "chestxray14", "--src", str(cxr14["nested"]["root"]),
           "--out", str(out), "--size", "16", "--skip-bad", "--workers", "2"]
    p = subprocess.run(cmd, env=dict(os.environ, **{dp.KILL_AFTER_ENV: "7"}), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == -9, p.stderr                         # SIGKILLed mid-way by the test hook
    with pytest.raises(FileNotFoundError, match="data_prep.py chestxray14"):
        dp.open_cache(out)
    leftovers = [x.name for x in tmp_path.iterdir()]                 # a kill -9 cleans nothing: the next run does
    assert leftovers and all(x.startswith(".chestxray14.tmp-") or x == ".chestxray14.lock" for x in leftovers)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)   # a re-run starts clean and succeeds
    assert p.returncode == 0, p.stderr
    assert len(dp.open_cache(out)) == len(cxr14["nested"]["recs"]) - 2
    assert [x.name for x in tmp_path.iterdir()] == ["chestxray14"], "stale temp folder not removed"


def test_patient_split_hits_the_authors_proportions():
    rng = np.random.default_rng(0)
    counts = {f"p{i}": int(c) for i, c in enumerate(rng.geometric(0.35, 3000))}   # CXR14-like images/patient
    frac = dp.CXR14_VAL / (dp.CXR14_TRAIN + dp.CXR14_VAL)
    val = dp.patient_split(counts, frac, seed=0)
    n = sum(counts.values())
    assert sum(counts[p] for p in val) == round(frac * n)
    assert val == dp.patient_split(dict(reversed(list(counts.items()))), frac, seed=0)  # order-free
    assert val != dp.patient_split(counts, frac, seed=1)


# ----------------------------------------------------------------------------------------------------
# EyePACS, JSRT/SCR, DICOM folder

def test_eyepacs(tmp_path):
    src = tmp_path / "eyepacs"
    (src / "train").mkdir(parents=True)
    rng = np.random.default_rng(3)
    rows, shapes = [], [(60, 40), (50, 50), (45, 70)]
    for pid in (10, 13, 15, 16, 21, 22):
        for eye in ("left", "right"):
            w, h = shapes[(pid + len(eye)) % 3]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / "train" / f"{pid}_{eye}.jpeg",
                                                                                 quality=90)
            rows.append((f"{pid}_{eye}", int(rng.integers(0, 5))))
    rows.append(("99_left", 2))                                  # in the CSV, file absent
    with open(src / "trainLabels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "level")] + rows)
    out = tmp_path / "cache"
    dp.main(["eyepacs", "--src", str(src), "--out", str(out), "--size", "16", "--workers", "1"])
    c = dp.open_cache(out)
    assert c.images.shape == (12, 16, 16, 3) and c.meta["channels"] == 3
    level = dict(rows)
    for r in c.index:
        im = Image.open(src / "train" / f"{r['name']}.jpeg")
        im.draft("RGB", (16, 16))
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((16, 16), Image.BILINEAR)
        np.testing.assert_array_equal(c.images[r["i"]], np.asarray(im), err_msg=r["name"])
        assert r["labels"] == [f"grade{level[r['name']]}"] and r["level"] == str(level[r["name"]])
        assert r["patient"] == r["name"].split("_")[0]
    by_patient = {}
    for r in c.index:
        by_patient.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    assert json.loads((out / "report.json").read_text())["missing_files"] == ["99_left"]


def _write_jsrt_img(path, side, rng):
    v = rng.integers(0, 4096, (side, side)).astype(">u2")      # big-endian 12-bit values in 16-bit words
    path.write_bytes(v.tobytes())
    return v.astype(np.int64)


def test_jsrt_scr(tmp_path):
    rng = np.random.default_rng(4)
    src, scr = tmp_path / "jsrt", tmp_path / "scr"
    src.mkdir()
    names = ["JPCLN001", "JPCLN002", "JPCNN001", "JPCNN002", "JPCLN003", "JPCNN003"]
    raw, masks = {}, {}
    for j, n in enumerate(names):
        raw[n] = _write_jsrt_img(src / f"{n}.IMG", 32, rng)
        fold = "fold1" if j < 4 else "fold2"
        masks[n] = []
        for folder in dp.SCR_FOLDERS:                              # folder names with spaces, as SCR ships them
            d = scr / "scratch" / fold / "masks" / folder
            d.mkdir(parents=True, exist_ok=True)
            m = (rng.random((16, 16)) > 0.6).astype(np.uint8) * 255
            Image.fromarray(m).save(d / f"{n}.gif")
            masks[n].append(m)
    out = tmp_path / "cache"
    dp.main(["jsrt", "--src", str(src), "--masks", str(scr), "--out", str(out), "--size", "24", "--workers", "1"])
    c = dp.open_cache(out)
    assert c.meta["structures"] == dp.STRUCTURES and c.masks.shape == (6, 5, 24, 24)
    for r in c.index:
        grey = (255 - (raw[r["name"]] * 255 + 2047) // 4095).astype(np.uint8)      # inverted 12 -> 8 bit
        np.testing.assert_array_equal(c.images[r["i"]],
                                      np.asarray(Image.fromarray(grey).resize((24, 24), Image.BILINEAR)))
        for s, m in enumerate(masks[r["name"]]):
            want = np.asarray(Image.fromarray(m).resize((24, 24), Image.NEAREST)) > 0
            np.testing.assert_array_equal(c.masks[r["i"], s], want.astype(np.uint8))
        assert r["labels"] == (["nodule"] if r["name"].startswith("JPCLN") else [])
        assert (r["split"] == "test") == (names.index(r["name"]) >= 4)
    # an image lacking one SCR mask is an error naming it, or skipped and reported with --skip-bad
    (scr / "scratch" / "fold2" / "masks" / "left clavicle" / "JPCNN003.gif").unlink()
    with pytest.raises(SystemExit):
        dp.main(["jsrt", "--src", str(src), "--masks", str(scr), "--out", str(tmp_path / "c1"), "--size", "24",
                 "--workers", "1"])
    dp.main(["jsrt", "--src", str(src), "--masks", str(scr), "--out", str(tmp_path / "c1"), "--size", "24",
             "--workers", "1", "--skip-bad"])
    rep = json.loads((tmp_path / "c1" / "report.json").read_text())
    assert [b["name"] for b in rep["bad"]] == ["JPCNN003"] and "left_clavicle" in rep["bad"][0]["error"]
    assert len(dp.open_cache(tmp_path / "c1")) == 5
    # a raw file whose size is not a square 16-bit image is named in the error
    (src / "JPCNN009.IMG").write_bytes(b"\0" * 100)
    with pytest.raises(SystemExit):
        dp.main(["jsrt", "--src", str(src), "--out", str(tmp_path / "c2"), "--size", "24", "--workers", "1"])
    with pytest.raises(ValueError, match="JPCNN009"):
        dp.jsrt_to_grey(b"\0" * 100, "JPCNN009.IMG")


def test_dicom_folder_monochrome1(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    dcm = get_testdata_file("RG1_UNCR.dcm")                    # real PA chest CR, MONOCHROME1, 15-bit
    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    shutil.copy(dcm, src / "sub" / "chest.dcm")
    Image.fromarray(np.full((30, 20), 7, np.uint8)).save(src / "a.png")
    out = tmp_path / "cache"
    dp.main(["folder", "--src", str(src), "--out", str(out), "--size", "64", "--workers", "1"])
    c = dp.open_cache(out)
    assert [r["name"] for r in c.index] == ["a.png", "sub/chest.dcm"]
    assert all(r["split"] == "train" for r in c.index)
    from pydicom.pixels import apply_voi_lut
    ds = pydicom.dcmread(dcm)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "VOILUTFunction" not in ds   # LINEAR window
    a = ds.pixel_array.astype(np.float64)
    top = 2 ** ds.BitsStored - 1                                   # unsigned, no rescale: output 0 .. 2^15 - 1
    g = 255 - np.rint(apply_voi_lut(a, ds) / top * 255)            # pydicom's window, then invert MONOCHROME1
    h, w = g.shape
    fw, fh = round(w * 64 / max(h, w)), round(h * 64 / max(h, w))    # the recipe's pad: resize to fit, then pad
    x0, y0 = (64 - fw) // 2, (64 - fh) // 2
    want = np.zeros((64, 64), np.uint8)
    want[y0:y0 + fh, x0:x0 + fw] = np.asarray(Image.fromarray(g.astype(np.uint8)).resize((fw, fh), Image.BILINEAR))
    got = c.images[1]
    np.testing.assert_array_equal(got, want)
    # independent of the recipe: the inverted image anticorrelates with the raw detector values
    raw = np.asarray(Image.fromarray(a.astype(np.float32)).resize((fw, fh), Image.BILINEAR))
    got, inside = got[y0:y0 + fh, x0:x0 + fw], np.s_[:, 1:-1]    # columns clear of the padding
    assert np.corrcoef(got[inside].ravel().astype(float), raw[inside].ravel())[0, 1] < -0.99
    assert c.index[1]["patient"] == str(ds.PatientID)
    np.testing.assert_array_equal(c.images[0][(64 - 43) // 2 + 5, 32], 7)     # the padded PNG


# ----------------------------------------------------------------------------------------------------
# Phantom

@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return dp.ensure_phantom(tmp_path_factory.mktemp("ph") / "phantom", num_images=40, size=64, seed=0)


def test_phantom_cache(phantom, capsys):
    c = dp.open_cache(phantom)
    n = 40
    assert c.images.shape == (n, 64, 64) and c.images.dtype == np.uint8
    assert c.masks.shape == (n, 5, 64, 64) and c.masks.dtype == np.uint8 and set(np.unique(c.masks)) == {0, 1}
    assert c.landmarks.shape == (n, 10, 2) and c.landmarks.dtype == np.float32
    assert c.meta["structures"] == dp.STRUCTURES and c.meta["landmark_names"] == dp.LANDMARKS
    assert Counter(r["split"] for r in c.index) == {"train": 28, "val": 4, "test": 8}
    assert ((c.landmarks >= 0) & (c.landmarks <= 63)).all()
    assert (c.masks.reshape(n, 5, -1).sum(-1) > 0).all(), "an empty mask"
    labels = Counter(l for r in c.index for l in r["labels"])
    assert all(labels[l] > 0 for l in dp.PHANTOM_LABELS), labels
    y = c.label_matrix()
    assert y.shape == (n, 3) and [int(x) for x in y.sum(0)] == [labels[l] for l in dp.PHANTOM_LABELS]
    assert all(y[r["i"], dp.PHANTOM_LABELS.index(l)] == 1 for r in c.index for l in r["labels"])
    for sp in ("train", "val", "test"):
        assert (phantom / f"{sp}_list.txt").read_text().split() == [c.index[i]["name"] for i in c.rows(sp)]
    png = np.asarray(Image.open(phantom / "png" / f"{c.index[3]['name']}.png"))
    np.testing.assert_array_equal(png, c.images[3])
    with open(phantom / "landmarks.csv") as f:
        row = list(csv.reader(f))[4]
    np.testing.assert_allclose(np.array(row[1:], float).reshape(10, 2), c.landmarks[3], atol=0.006)
    # ensure_phantom leaves an existing cache alone, and says so when it differs from the request
    t = (phantom / "meta.json").stat().st_mtime_ns
    dp.ensure_phantom(phantom, num_images=40, size=64, seed=0)
    assert (phantom / "meta.json").stat().st_mtime_ns == t and "warning" not in capsys.readouterr().err
    dp.ensure_phantom(phantom, num_images=50, size=64, seed=0)
    assert (phantom / "meta.json").stat().st_mtime_ns == t and "40 != 50" in capsys.readouterr().err


def test_phantom_anatomy_is_plausible():
    for i in range(6):
        img, m, lmk, labels = dp.phantom_sample(i, 128, seed=0)
        ys, xs = np.mgrid[:128, :128]
        cx = [(xs * mm).sum() / mm.sum() for mm in m]              # centroids in STRUCTURES order
        cy = [(ys * mm).sum() / mm.sum() for mm in m]
        heart, lclav, rclav, llung, rlung = range(5)
        assert cx[rlung] < cx[heart] < cx[llung]                   # heart between the lungs
        assert cx[rclav] < cx[lclav] and cy[lclav] < cy[llung]      # patient's left is on the image's right
        assert (m[heart] & m[llung]).sum() == 0                     # the lung field excludes the heart
        L = dict(zip(dp.LANDMARKS, lmk))
        assert L["trachea_top"][1] < L["carina"][1] < L["left_hemidiaphragm"][1]
        assert L["left_apex"][0] > L["right_apex"][0] and L["left_costophrenic"][0] > L["right_costophrenic"][0]
        # bright mediastinum and dark lungs, as in a PA radiograph
        assert img[m[heart] > 0].mean() > img[m[llung] > 0].mean() + 20
        xr, yr = L["right_hemidiaphragm"]                          # the liver under the right dome
        liver = (m.sum(0) == 0) & (ys > yr + 6) & (ys < yr + 18) & (np.abs(xs - xr) < 10)
        assert img[m[rlung] > 0].mean() < img[liver].mean() - 20


def test_a_phantom_of_another_generator_version_is_kept_with_a_warning(tmp_path, capsys):
    root = dp.ensure_phantom(tmp_path / "phantom", num_images=4, size=32, seed=0)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["phantom_version"] == dp.PHANTOM_VERSION
    del meta["phantom_version"]                                 # as version 1 wrote it
    (root / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    dp.ensure_phantom(root, num_images=4, size=32, seed=0)
    err = capsys.readouterr().err
    assert "phantom_version" in err and f"None != {dp.PHANTOM_VERSION}" in err and "delete it" in err


def test_phantom_is_a_function_of_the_seed():
    a, b, c = dp.phantom_sample(5, 64, seed=0), dp.phantom_sample(5, 64, seed=0), dp.phantom_sample(5, 64, seed=1)
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_open_cache_errors(phantom, tmp_path):
    with pytest.raises(FileNotFoundError, match="data_prep.py phantom --out"):
        dp.open_cache(tmp_path / "phantom")
    bad = tmp_path / "bad"
    shutil.copytree(phantom, bad)
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps(dict(meta, count=41)))
    with pytest.raises(ValueError, match="images.npy"):
        dp.open_cache(bad)
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        dp.open_cache(bad)


@pytest.mark.slow
def test_phantom_cli_force_and_concurrent_ensure(tmp_path, capsys):
    out = tmp_path / "phantom"
    args = ["phantom", "--out", str(out), "--num-images", "6", "--size", "32", "--workers", "1"]
    dp.main(args)
    first = np.array(dp.open_cache(out).images)
    with pytest.raises(SystemExit):
        dp.main(args)                                              # an existing cache is not overwritten
    assert "--force" in capsys.readouterr().err
    dp.main(args[:-2] + ["--seed", "3", "--force", "--workers", "2"])
    assert not np.array_equal(np.array(dp.open_cache(out).images), first)
    # two processes (e.g. torchrun ranks) ensuring the same phantom at once: both succeed, one cache results
    root = tmp_path / "shared" / "phantom"
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import data_prep as dp; " \
           f"dp.ensure_phantom({str(root)!r}, num_images=30, size=48, seed=0); print(len(dp.open_cache({str(root)!r})))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == ["30", "30"]
    assert [x.name for x in root.parent.iterdir()] == ["phantom"]


def test_folder_16bit_png_is_min_max_scaled(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a = np.random.default_rng(5).integers(1000, 40000, (20, 20)).astype(np.uint16)
    Image.fromarray(a).save(src / "x16.png")
    assert Image.open(src / "x16.png").mode.startswith("I")
    dp.main(["folder", "--src", str(src), "--out", str(tmp_path / "c"), "--size", "20", "--workers", "1"])
    a = a.astype(np.int64)
    want = np.rint((a - a.min()) * 255 / (a.max() - a.min())).astype(np.uint8)
    np.testing.assert_array_equal(dp.open_cache(tmp_path / "c").images[0], want)


def test_measure_read_speed_runs(phantom):
    r = dp.measure_read_speed(phantom, n=10, png_side=128)
    assert r["shape"] == [40, 64, 64] and all(r[k] > 0 for k in r if k.endswith("_per_s"))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_archive_is_named(cxr14, tmp_path, capsys, workers):
    src = tmp_path / "src"
    shutil.copytree(cxr14["tar"]["root"], src)
    arc = src / "images_002.tar.gz"
    arc.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    out = tmp_path / "chestxray14"
    with pytest.raises(SystemExit):
        dp.main(["chestxray14", "--src", str(src), "--out", str(out), "--size", "16", "--skip-bad",
                 "--workers", str(workers)])
    assert "images_002.tar.gz is corrupt or truncated" in capsys.readouterr().err
    assert not out.exists()


def test_phantom_cardiomegaly_means_cardiothoracic_ratio_above_half():
    ctr = {True: [], False: []}
    for i in range(40):
        _, m, _, labels = dp.phantom_sample(i, 64, seed=2)
        heart_x = np.flatnonzero(m[0].any(0))
        lungs_x = np.flatnonzero((m[3] | m[4]).any(0))
        ctr["cardiomegaly" in labels].append((np.ptp(heart_x) + 1) / (np.ptp(lungs_x) + 1))
    assert ctr[True] and ctr[False]
    assert np.mean(ctr[True]) > 0.5 > np.mean(ctr[False])


def test_missing_label_csv_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "src" / "images").mkdir(parents=True)
    with pytest.raises(SystemExit):
        dp.main(["chestxray14", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert "Data_Entry_2017.csv" in err and "Traceback" not in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# The front and its modules

LAYERS = ["safe_files", "decode", "caches", "phantom", "open_data", "convert", "scanners", "tables"]
SCRIPTS = {"adam", "data_prep", "finetune", "eve", "ablate", "bench"}


def _imports(path):
    """The modules a file imports: adam_cxr.X as X, anything else by its top-level name."""
    found = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            found |= {a.name.split(".")[0] if not a.name.startswith("adam_cxr.") else a.name[9:] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            found |= ({a.name for a in n.names} if n.module == "adam_cxr" else
                      {n.module[9:]} if n.module.startswith("adam_cxr.") else {n.module.split(".")[0]})
    return found


def test_the_data_modules_import_downward_only():
    """data_prep.py's pieces are layers: each imports only the ones before it in LAYERS (no import circle, at the
    top level or inside a function), none imports a script, and runs.py takes its safe writing from safe_files
    without importing data_prep."""
    for j, name in enumerate(LAYERS):
        got = _imports(ROOT / "adam_cxr" / f"{name}.py")
        assert not got & SCRIPTS and got & set(LAYERS) <= set(LAYERS[:j]), (name, got)
    assert "data_prep" not in _imports(ROOT / "adam_cxr" / "runs.py")
    assert _imports(ROOT / "data_prep.py") & set(LAYERS) == set(LAYERS)


def test_the_front_is_thin_and_keeps_its_names():
    """data_prep.py is the command line (a table of commands); `import data_prep` still offers what the scripts and
    the tests use, as the very objects of the modules."""
    assert len((ROOT / "data_prep.py").read_text().splitlines()) <= 400
    from adam_cxr import caches, decode, open_data, phantom, safe_files
    for module, names in ((open_data, "open_dataset open_images dataset_root CacheImages FolderImages"),
                          (caches, "open_cache DataError STRUCTURES measure_read_speed"),
                          (decode, "read_image dicom_to_grey jsrt_to_grey voi_output_range"),
                          (phantom, "ensure_phantom phantom_sample LANDMARKS PHANTOM_LABELS PHANTOM_VERSION"),
                          (safe_files, "DiskFull FolderLock TMP_FOLDER")):
        for n in names.split():
            assert getattr(dp, n) is getattr(module, n), n
    assert set(dp.COMMANDS) == {"phantom", "chestxray14", "eyepacs", "jsrt", "folder", "csv", "speed"}
