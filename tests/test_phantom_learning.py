"""docs/phantom_learning.py, the phantom's learning run: its statistics on hand-computed records, and a rerun that
reuses what a seed saved instead of training or measuring again (the run itself is docs/learning.md's)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("phantom_learning", ROOT / "docs" / "phantom_learning.py")
pl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pl)


def record(seed, shift, dice):
    """A seed's record: random init's landmark errors 10 .. 19 px over 2 pairs x 5 landmarks, the pretrained ones
    `shift` px away; heart Dice @12 `dice` (pretrained) against 0.5."""
    base = np.arange(10, 20, dtype=float).reshape(2, 5)
    row = lambda errors, d: {**{k: 0.0 for k in pl.KEYS}, "landmark_median_px": float(np.median(errors)),
                             "heart@12_dice": d}
    return dict(seed=seed, pretrained=row(base + shift, dice), random=row(base, 0.5),
                pretrained_errors=(base + shift).tolist(), random_errors=base.tolist())


def test_compare_gives_the_paired_differences_by_hand():
    recs = [record(0, -2.0, 0.7), record(1, -3.0, 0.6), record(2, -4.0, 0.8)]
    res = pl.compare(recs)
    med = res["landmark_median_px"]
    assert med["random"] == [14.5] * 3 and med["pretrained"] == [12.5, 11.5, 10.5]
    assert med["diff"] == pytest.approx(-3.0) and med["lower_is_better"]
    # differences -2, -3, -4: mean -3, sd 1, t = -3 / (1 / sqrt 3) = -5.196 with 2 df -> p = 0.0351
    assert med["p_seeds"] == pytest.approx(0.0351, abs=5e-4)
    dice = res["heart@12_dice"]
    assert dice["diff"] == pytest.approx(0.2) and not dice["lower_is_better"]
    # differences 0.2, 0.1, 0.3: t = 0.2 / (0.1 / sqrt 3) = 3.464, 2 df -> p = 0.0742
    assert dice["p_seeds"] == pytest.approx(0.0742, abs=5e-4)
    allp = res["landmark_errors_all"]
    assert allp["n"] == 30 and allp["median_diff"] == -3.0 and allp["mean_diff"] == pytest.approx(-3.0)
    assert allp["p_wilcoxon"] < 1e-5                     # 30 differences, every one negative


def test_a_seed_with_saved_measures_is_neither_trained_nor_measured_again(tmp_path, monkeypatch):
    saved = record(3, -1.0, 0.6)
    (tmp_path / "seed3").mkdir()
    (tmp_path / "seed3" / "frozen.json").write_text(json.dumps(saved))

    def refuse(*a, **k):
        raise AssertionError("trained or measured again")
    monkeypatch.setattr(pl.adam, "main", refuse)
    monkeypatch.setattr(pl, "measure", refuse)
    assert pl.one_seed(tmp_path, 3, cache=None) == saved
