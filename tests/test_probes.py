"""adam_cxr/probes.py: each frozen-feature measure against a hand-computed case (features of known content), and
measure() end to end on a tiny phantom."""
import numpy as np
import pytest
import torch
import torchvision

from adam_cxr import probes


def test_knn_votes_by_cosine_and_breaks_ties_to_the_smallest_label():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    y = np.array([0, 0, 1, 1])
    test = np.array([[10, 1], [1, 10], [1, 1]], np.float32)     # scale does not matter (cosine); the last ties
    truth = np.array([0, 1, 1])
    assert probes.knn(train, y, test, truth, k=1) == pytest.approx(2 / 3)   # [1,1]: train 1 first (stable order)
    assert probes.knn(train, y, test, truth, k=2) == pytest.approx(2 / 3)   # [1,1]: one vote each -> label 0
    assert probes.knn(train, y, test, truth, k=4) == pytest.approx(1 / 3)   # every test point: 2 votes each -> 0


def test_linear_probe_separates_what_is_separable_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    informative = np.eye(3)[y] * 3 + rng.normal(0, 0.3, (300, 3))
    noise = rng.normal(0, 1, (300, 3))
    assert probes.linear_probe(informative[:200], y[:200], informative[200:], y[200:]) == 1.0
    assert probes.linear_probe(noise[:200], y[:200], noise[200:], y[200:]) < 0.6


def test_landmarks_find_a_shifted_landmark_that_the_nolook_baseline_misses():
    # features that encode position: image j is image i shifted by (dx, dy) = (16, 8) pixels = (2, 1) cells
    S, h = 64, 8
    yy, xx = np.mgrid[0:h + 4, 0:h + 4]
    code = np.stack([np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.5) for cy in range(h + 4) for cx in range(h + 4)])
    fi, fj = code[:, 2:2 + h, 2:2 + h], code[:, 1:1 + h, 0:h]   # j's cell (r, c) holds i's cell (r - 1, c - 2)
    feats = np.stack([fi, fj]).astype(np.float32)
    lm_i = np.array([[20.0, 28.0], [44.0, 36.0]])                 # (x, y) at cell centres (8 px cells)
    lm = np.stack([lm_i, lm_i + [16, 8]]).astype(np.float32)
    err, nolook = probes.landmarks(feats, lm, S, [(0, 1)])
    assert err.shape == (1, 2) and np.all(err < 2.0)
    np.testing.assert_allclose(nolook, np.hypot(16, 8) * np.ones((1, 2)), rtol=1e-6)
    s = probes.summarise_errors(np.array([1.0, 3.0, 20.0, 40.0]), within=16)
    assert s == {"median": 11.5, "mean": 16.0, "within": 0.5}


def test_dice_of_hand_made_masks():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[:2], b[1:3] = True, True                                     # 8 and 8 pixels, 4 shared
    assert probes.dice(a, b) == 0.5
    assert probes.dice(a & False, b & False) == 1.0


def test_mask_probe_learns_a_mask_that_is_in_the_features_and_the_nolook_is_the_mean_mask():
    rng = np.random.default_rng(0)
    n, h, H = 6, 8, 32
    masks = np.zeros((n, H, H), bool)
    for i in range(n):
        r, c = rng.integers(0, 4, 2) * 8
        masks[i, r:r + 16, c:c + 16] = True                        # 2 x 2 cells, aligned to the grid
    cells = torch.nn.functional.avg_pool2d(torch.tensor(masks, dtype=torch.float32)[:, None], 4)[:, 0].numpy()
    feats = np.stack([cells, rng.normal(0, 1, cells.shape)], 1).astype(np.float32)  # n x 2 x h x w
    d, ap = probes.mask_probe(feats[:3], masks[:3], feats[3:], masks[3:])
    assert min(d) > 0.95 and ap > 0.95
    d0, _ = probes.mask_nolook(masks[:3], masks[3:])
    mean = masks[:3].mean(0) >= 0.5
    assert d0 == [probes.dice(mean, m) for m in masks[3:]]


def test_label_probe_reports_an_undefined_auc_with_its_reason_never_nan():
    rng = np.random.default_rng(0)
    f = rng.normal(0, 1, (40, 4))
    y = np.stack([(f[:, 0] > 0), np.zeros(40, bool)], 1).astype(np.float32)
    out = probes.label_probe(f[:30], y[:30], f[30:], y[30:], ["sep", "never"])
    assert out["sep"] > 0.9
    assert out["never"] == "undefined: the train images are all negative"


def test_measure_on_a_tiny_phantom_gives_every_headline_number(phantom_root):
    import data_prep
    cache = data_prep.open_cache(phantom_root)
    torch.manual_seed(0)
    bb = torchvision.models.resnet18(weights=None)
    bb.fc = torch.nn.Identity()
    res = probes.measure(bb, cache, size=64, shots=(3,), draws=2, test_images=6)
    row = probes.headline(res)
    for key in ("landmark_median_px", "landmark_nolook_median_px", "heart@3_dice", "heart@3_nolook_dice",
                "clavicles@3_ap"):
        assert isinstance(row[key], float) and np.isfinite(row[key]), key
    assert all(isinstance(v, (float, str)) for k, v in row.items() if k.startswith("auc_"))
    assert res["landmarks"]["errors"].shape == (5, len(cache.meta["landmark_names"]))
    assert probes.nolook_key("heart@3_dice") == "heart@3_nolook_dice"
    assert probes.nolook(row, "heart@3_dice") == row["heart@3_nolook_dice"] and probes.nolook(row, "auc_nodule") == 0.5
    assert probes.lower_is_better("landmark_mean_px") and not probes.lower_is_better("landmark_within16")


@pytest.mark.slow
def test_eve_frozen_prints_the_table_beside_random_init_and_the_nolook(phantom_root, tmp_path, capsys):
    import eve
    s = eve.main(["--data", str(phantom_root), "--arch", "resnet18", "--img-size", "32", "--what", "frozen",
                  "--frozen-size", "64", "--draws", "1", "--num-images", "6", "--out", str(tmp_path / "eve"),
                  "--device", "cpu"])
    out = capsys.readouterr().out
    assert "frozen features" in out and "no look" in out
    row = s["results"]["random"]["frozen"]               # random init is added when frozen is asked for
    assert isinstance(row["landmark_median_px"], float) and isinstance(row["heart@3_dice"], float)
