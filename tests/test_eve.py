"""eve.py: each measurement on constructed cases whose answer is known in advance, figures, and one small run
on phantoms with the tiny pretrained checkpoint (conftest's tiny_adam_run)."""
import json
import math

import numpy as np
import pytest
import torch
import torchvision

import eve

LM = 10  # landmarks per image, as in the phantom


class OneHotCentre(torch.nn.Module):
    """Reads the patch's centre pixel v and returns one_hot(round(v * 11) - 1): a perfect landmark detector
    when landmark l is painted with intensity (l + 1) / 11."""

    def forward(self, x):  # B x 1 x S x S
        v = x[:, 0, x.shape[2] // 2, x.shape[3] // 2]
        return torch.nn.functional.one_hot((v * 11).round().long() - 1, LM).float()


def painted_images(n=12, size=64, seed=0):
    """n images of faint noise with landmark l painted as a 5 x 5 square of intensity (l + 1) / 11 at a
    random place (landmarks may overlap a neighbour's patch, never its centre square)."""
    rng = np.random.default_rng(seed)
    imgs = rng.uniform(0, 0.02, (n, 1, size, size)).astype(np.float32)
    lms = np.zeros((n, LM, 2), np.float32)
    for i in range(n):
        pts = []
        while len(pts) < LM:
            p = rng.integers(4, size - 4, 2)
            if all(np.abs(p - q).max() > 5 for q in pts):
                pts.append(p)
        for l, (x, y) in enumerate(pts):
            imgs[i, 0, y - 2:y + 3, x - 2:x + 3] = (l + 1) / 11
            lms[i, l] = x, y
    return imgs, lms


# ----------------------------------------------------------------------------- locality

def test_locality_perfect_features_give_accuracy_one():
    imgs, lms = painted_images()
    res, feats, labels = eve.locality(OneHotCentre(), imgs, lms, img_size=16, patch=16, k=3, folds=4)
    assert feats.shape == (12 * LM, LM) and (labels == np.tile(np.arange(LM), 12)).all()
    assert res["knn_accuracy"] == 1.0
    assert res["silhouette"] > 0.99  # every cluster is one point repeated: silhouette exactly 1 up to rounding
    assert res["chance"] == pytest.approx(0.1)


def test_locality_constant_encoder_is_at_chance():
    imgs, lms = painted_images()
    const = lambda x: torch.ones(x.shape[0], 7)  # noqa: E731
    res, _, _ = eve.locality(const, imgs, lms, img_size=16, patch=16, k=5, folds=4)
    # balanced classes: a constant prediction is right exactly 1/10 of the time, whatever label it picks
    assert res["knn_accuracy"] == pytest.approx(0.1, abs=1e-12)
    assert res["silhouette"] == pytest.approx(0.0, abs=1e-12)


def test_knn_folds_are_grouped_by_image():
    # each image appears twice (same group): a patch's exact duplicate must never be its neighbour, so
    # features that only identify the patch (not the landmark) stay at chance; plain k-fold would give ~1.
    rng = np.random.default_rng(0)
    n = 40
    u = rng.normal(size=(n * LM, 32))
    labels, groups = np.tile(np.arange(LM), n), np.repeat(np.arange(n), LM)
    acc = eve.knn_accuracy(np.concatenate([u, u]), np.concatenate([labels, labels]),
                           np.concatenate([groups, groups]), k=1, folds=5)
    assert acc < 0.25  # chance 0.1; std of the estimate ~0.01


# ----------------------------------------------------------------------------- compositionality

@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_split_box_tiles_exactly(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        box = (int(rng.integers(0, 5)), int(rng.integers(0, 5)), int(rng.integers(8, 40)), int(rng.integers(8, 40)))
        parts = eve.split_box(box, n, rng)
        cover = np.zeros((50, 50), int)
        for y, x, h, w in parts:
            assert h > 0 and w > 0
            cover[y:y + h, x:x + w] += 1
        want = np.zeros_like(cover)
        want[box[0]:box[0] + box[2], box[1]:box[1] + box[3]] = 1
        assert len(parts) == n and (cover == want).all()  # no pixel lost, none shared


def test_compositionality_linear_encoder_pad_mode_is_exactly_one():
    # pad mode: the zero-padded parts sum to the whole and resizing is linear, so f(whole) = sum f(parts)
    g = torch.Generator().manual_seed(0)
    Wt = torch.randn(16, 16 * 16, generator=g)
    linear = lambda x: x.flatten(1) @ Wt.T  # noqa: E731
    imgs = np.random.default_rng(0).uniform(-1, 1, (3, 1, 48, 48)).astype(np.float32)  # zero mean
    cos, base = eve.compositionality(linear, imgs, img_size=16, parts=(2, 3, 4), num=10, mode="pad",
                                     baseline=True)
    for n in (2, 3, 4):
        # float32 sums of 256 terms: relative error ~1e-6, so 1e-5 on a cosine
        np.testing.assert_allclose(cos[n], 1.0, atol=1e-5)
        assert abs(base[n].mean()) < 0.5  # another patch's parts: unrelated zero-mean noise
    resized = eve.compositionality(linear, imgs, img_size=16, parts=(2,), num=10, mode="resize")
    assert resized[2].mean() < 0.99  # the paper's protocol is not trivially 1 for the same encoder


@pytest.mark.parametrize("n", [2, 3, 4])
def test_compositionality_affine_encoder_known_value(n):
    # f(x) = [sum(x), 1] on a constant image c: whole = [a, 1] with a = c S^2. pad mode: the parts add to
    # [a, n], cosine (a^2 + n) / sqrt((a^2 + 1)(a^2 + n^2)); resize mode: each part is [a, 1], the sum is
    # parallel to the whole, cosine 1.
    S, c = 8, 1 / 64  # a = 1: the cosines differ a lot between n = 2, 3, 4
    f = lambda x: torch.stack([x.flatten(1).sum(1), torch.ones(x.shape[0])], 1)  # noqa: E731
    imgs = np.full((2, 1, 40, 40), c, np.float32)
    a = c * S * S
    want = (a * a + n) / math.sqrt((a * a + 1) * (a * a + n * n))
    pad = eve.compositionality(f, imgs, img_size=S, parts=(n,), num=6, mode="pad")[n]
    np.testing.assert_allclose(pad, want, atol=1e-5)
    res = eve.compositionality(f, imgs, img_size=S, parts=(n,), num=6, mode="resize")[n]
    np.testing.assert_allclose(res, 1.0, atol=1e-5)
    s = eve.describe(pad)
    assert s["q25"] <= s["median"] <= s["q75"] and s["n"] == 6


# ----------------------------------------------------------------------------- correspondence

def texture(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (1, size, size)).astype(np.float32)


def test_warp_matches_apply_affine():
    H = W = 64
    T = eve.affine(H, W, rotate=20, scale=1.15, shift=(0.06, -0.04))
    for x, y in [(20, 30), (40, 18), (31, 45)]:
        img = np.zeros((1, H, W), np.float32)
        img[0, y, x] = 1
        b = eve.warp(img, T)
        by, bx = np.unravel_index(b[0].argmax(), b[0].shape)
        tx, ty = eve.apply_affine(T, np.array([[x, y]], float))[0]
        assert abs(bx - tx) <= 1 and abs(by - ty) <= 1
    # and a pure integer shift is exactly a shift of the array
    a = texture(H)
    b = eve.warp(a, eve.affine(H, W, shift=(8 / W, 0)))
    np.testing.assert_allclose(b[:, :, 8:], a[:, :, :-8], atol=1e-6)


def flat_pixels(x):  # B x 1 x S x S -> B x S*S: distinct patches give distinct features
    return x.flatten(1) - x.flatten(1).mean(1, keepdim=True)


@pytest.mark.parametrize("mode", ["patch", "map"])
def test_zero_transform_is_perfect_correspondence(mode):
    torch.manual_seed(0)
    enc = eve.BackboneFeatures(torchvision.models.resnet18()).eval() if mode == "map" else flat_pixels
    a = texture(64)
    G = 4
    T = eve.affine(64, 64)  # identity
    np.testing.assert_allclose(T, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    lms = np.array([[5.0, 7.0], [33.0, 50.0], [60.0, 2.0]])
    fa = eve.grid_features(enc, a, G, img_size=32 if mode == "patch" else 64, mode=mode)
    assert fa.shape[0] == G * G
    num, m = eve.correspond(fa, fa.copy(), T, 64, 64, G, lms)
    assert num["within_one_cell"] == 1.0 and num["exact_cell"] == 1.0 and num["cells"] == G * G
    assert num["landmark_error_px"] == 0.0


def test_one_cell_shift_is_found_exactly():
    # B = A shifted right by one cell: the true match of cell c is c + 1; a sign error would score 0 exact.
    H = W = 64
    G = 8
    a = texture(H, seed=1)
    T = eve.affine(H, W, shift=(1 / G, 0))
    b = eve.warp(a, T)
    fa = eve.grid_features(flat_pixels, a, G, img_size=8, context=1.0)
    fb = eve.grid_features(flat_pixels, b, G, img_size=8, context=1.0)
    lms = np.array([[3.0, 3.0], [20.0, 41.0]])
    num, m = eve.correspond(fa, fb, T, H, W, G, lms)
    assert num["cells"] == G * (G - 1)  # the last column moves out of B
    assert num["exact_cell"] == 1.0 and num["within_one_cell"] == 1.0
    assert num["landmark_error_px"] < 1e-9


def test_fit_affine_recovers_transform():
    T = eve.affine(64, 64, rotate=-12, scale=0.9, shift=(0.1, 0.02))
    src = np.random.default_rng(0).uniform(0, 64, (10, 2))
    np.testing.assert_allclose(eve.fit_affine(src, eve.apply_affine(T, src)), T, atol=1e-9)


def test_dicom_demo_image_is_inverted_and_8bit_range():
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data not installed")
    img = eve.read_dicom_grey(path, 64)
    assert img.shape == (1, 64, 64) and img.min() >= 0 and img.max() <= 1 and img.std() > 0.1
    # MONOCHROME1: high stored values are dark, so the image must anti-correlate with the raw values
    import pydicom
    from PIL import Image
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)
    s = min(raw.shape)
    y, x = (raw.shape[0] - s) // 2, (raw.shape[1] - s) // 2
    small = np.asarray(Image.fromarray(raw[y:y + s, x:x + s]).resize((64, 64)))
    assert np.corrcoef(small.ravel(), img.ravel())[0, 1] < -0.9


# ----------------------------------------------------------------------------- figures, CLI, end to end

def check_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    import os
    assert os.path.getsize(path) > 2000


def test_figures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    p = eve.fig_tsne({"a": (rng.normal(size=(30, 2)), np.arange(30) % LM), "b": (rng.normal(size=(30, 2)),
                     np.arange(30) % LM)}, tmp_path / "t.png", [f"lm{i}" for i in range(LM)])
    check_png(p)
    p = eve.fig_kde({"a": {2: rng.uniform(0.5, 1, 50), 3: np.ones(50)}, "b": ({2: rng.uniform(0, 1, 50),
                     3: rng.uniform(0, 1, 50)}, {2: rng.uniform(0, 1, 50), 3: rng.uniform(0, 1, 50)})},
                    tmp_path / "k.png")
    check_png(p)
    a = texture(32)
    fa = eve.grid_features(flat_pixels, a, 4, img_size=8)
    num, m = eve.correspond(fa, fa, eve.affine(32, 32), 32, 32, 4)
    check_png(eve.fig_matches({("x", "self"): (a, a, m, num)}, tmp_path / "m.png", 0.8, 10))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_bad_flags_and_files_fail_clearly(tmp_path):
    with pytest.raises(SystemExit):
        eve.get_args(["--what", "locality,beauty"])
    bad = tmp_path / "lm.csv"
    bad.write_text("image,x,y\na,1,2\n")
    with pytest.raises(ValueError, match="lm.csv"):
        eve.read_landmark_csv(bad, ["a"])
    good = tmp_path / "lm2.csv"
    good.write_text("name,landmark,x,y\na,apex,1,2\nb,carina,3,4\nb,apex,5,6\n")
    lms, names = eve.read_landmark_csv(good, ["a", "b"])
    assert names == ["apex", "carina"] and np.isnan(lms[0, 1]).all()
    np.testing.assert_allclose(lms[1], [[5, 6], [3, 4]])


@pytest.mark.slow
def test_run_on_phantom_with_tiny_checkpoint(tiny_adam_run, phantom_root, tmp_path):
    out = tmp_path / "eve"
    summary = eve.main(["--init", f"adam:{tiny_adam_run}", "--init", "random", "--compare", "--arch", "resnet18",
                        "--img-size", "32", "--data", "phantom", "--data-root", str(phantom_root),
                        "--split", "train", "--num-images", "4", "--num-patches", "4", "--corr-pairs", "2",
                        "--grid", "4", "--device", "cpu", "--out", str(out)])
    saved = json.loads((out / "eve.json").read_text())
    names = list(saved["results"])
    assert len(names) == 2 and names[1] == "random"
    for name in names:
        r = saved["results"][name]
        assert 0 <= r["locality"]["knn_accuracy"] <= 1 and -1 <= r["locality"]["silhouette"] <= 1
        assert set(r["compositionality"]) == {"2", "3", "4"}
        assert all(-1 <= v["mean"] <= 1 and -1 <= v["shuffled_mean"] <= 1 for v in r["compositionality"].values())
        c = r["correspondence"]
        assert {"self", "pair", "dicom_self"} <= set(c) or {"self", "pair"} <= set(c)
        assert 0 <= c["self"]["within_one_cell"] <= 1 and c["pair"]["landmark_error_px"] >= 0
    # the two encoders really are different networks
    assert saved["results"][names[0]]["locality"] != saved["results"]["random"]["locality"]
    for p in summary["figures"].values():
        check_png(p)
    assert set(summary["figures"]) == {"locality", "compositionality", "correspondence"}


@pytest.mark.slow
def test_compare_flag_forms(phantom_root, tmp_path):
    assert eve.get_args(["--init", "a", "--compare", "b", "c"]).inits == ["a", "b", "c"]
    assert eve.get_args(["--init", "a", "--init", "b", "--compare"]).compare == []
    assert eve.get_args([]).inits == ["random"]
    # without --compare every init gets its own figure
    summary = eve.main(["--init", "r1=random", "--init", "r2=random", "--arch", "resnet18", "--img-size", "16",
                        "--data-root", str(phantom_root), "--num-images", "3", "--what", "compositionality",
                        "--parts", "2", "--num-patches", "3", "--device", "cpu", "--out", str(tmp_path)])
    assert sorted(summary["figures"]) == ["compositionality_r1", "compositionality_r2"]
    for p in summary["figures"].values():
        check_png(p)
    r = summary["results"]  # same seed, same random init: the same numbers
    assert r["r1"]["compositionality"] == r["r2"]["compositionality"]
