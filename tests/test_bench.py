"""bench.py: the loss table on a tiny shape (every CPU path, flags named as adam.py's), the input-pipeline, train and
loader modes on the tiny phantom. Timings are printed, never asserted; these tests check that the modes run, time
what adam.py runs, and say what they measured."""
import math

import pytest

import adam
import adam_ext
import bench
from helpers import TINY_RUN


@pytest.mark.skipif(not adam_ext.is_built(), reason="the fused op is not built")
def test_loss_table_runs_every_cpu_path(tmp_path):
    md = tmp_path / "table.md"
    rows = bench.main(["--shape", "6,16,512", "--dtypes", "fp32,bf16", "--repeats", "1", "--no-mem",
                       "--temperature", "0.1", "--threshold", "0.5", "--md", str(md)])
    paths = [(d, p) for d in ("fp32", "bf16") for p in ("torch", "loop", "fused")]
    assert [(r["dtype"], r["path"]) for r in rows] == paths
    assert all(r["fwd_ms"] > 0 and r["fb_ms"] > 0 for r in rows)
    text = md.read_text()
    assert "T=0.1, t=0.5" in text and text.count("| cpu |") == 6


@pytest.mark.slow
def test_pipeline_mode_times_both_view_paths(phantom_root, capsys):
    flags = TINY_RUN + ["--data-root", str(phantom_root)]  # 48 phantoms, 36 in train: 4 batches of 8
    for extra in (["--views", "cpu"], ["--views", "device"]):
        rate = bench.main(["pipeline", "--batches", "2", *flags, *extra])
        assert rate > 0
    out = capsys.readouterr().out
    assert "views in workers" in out and "views BatchViews on cpu" in out
    with pytest.raises(ValueError, match="needs at least 96 images"):
        bench.main(["pipeline", *flags, "--batch-size", "32"])


@pytest.mark.skipif(not adam_ext.is_built(), reason="the fused op is not built")
def test_selfcheck_mode_writes_its_table_and_exits_1_on_a_wrong_op(tmp_path, monkeypatch):
    md = tmp_path / "selfcheck.md"
    results = bench.main(["selfcheck", "--scale", "quick", "--md", str(md)])
    assert results and all(r["ok"] for r in results)
    assert f"{len(results)}/{len(results)} cases pass" in md.read_text()
    real = adam_ext.ops.info_nce

    def off_by_a_thousandth(q, k, queue, temperature, threshold, return_pruned=False):
        loss, pruned = real(q, k, queue, temperature, threshold, return_pruned=True)
        return (loss * 1.001, pruned) if return_pruned else loss * 1.001
    monkeypatch.setattr(adam_ext.ops, "info_nce", off_by_a_thousandth)
    with pytest.raises(SystemExit, match=r"bench.py selfcheck: \d+ of \d+ cases disagree with adam.info_nce on CPU"):
        bench.main(["selfcheck", "--scale", "quick"])


@pytest.mark.slow
def test_train_mode_times_adams_own_step_three_ways(phantom_root, tmp_path, monkeypatch):
    """The three rows (step alone, device views, CPU loader) run adam.train_step itself, warm-up included, on the
    finest level of --levels; a folder that is not a cache gives the device row a reason instead of a number."""
    calls = []
    step = adam.train_step
    monkeypatch.setattr(adam, "train_step", lambda *a, **k: calls.append(a[0].shape) or step(*a, **k))
    flags = TINY_RUN + ["--data-root", str(phantom_root)]  # 36 train images: the loader loops over them
    md = tmp_path / "train.md"
    rows = bench.main(["train", "--steps", "2", "--warmup", "1", "--md", str(md), *flags])
    assert [r["row"] for r in rows] == ["step", "device", "cpu"]
    assert all(r["images_per_s"] > 0 and r["mem_mib"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert calls == [(8, 3, 32, 32)] * 3 * 3  # 1 + 2 steps a row, batch 8 of 32 px views
    text = md.read_text()
    assert "level 2" in text and "| step alone (synthetic views on the device) | " in text and "| 100% |" in text
    assert "peak RSS MiB" in text
    rows = bench.main(["train", "--rows", "step,device", "--steps", "1", "--warmup", "1", *TINY_RUN,
                       "--data", str(phantom_root / "png")])
    assert "images_per_s" in rows[0] and "--views device needs a data_prep.py cache" in rows[1]["skipped"]
    with pytest.raises(ValueError, match="--rows step,gpu: choose from step, monitor"):
        bench.main(["train", "--rows", "step,gpu", *flags])


@pytest.mark.slow
def test_loader_mode_costs_each_stage_of_the_device_views_loader(phantom_root, capsys):
    rows = bench.main(["loader", "--batches", "2", *TINY_RUN, "--data-root", str(phantom_root), "--levels", "0,2"])
    assert [(r["level"], r["part"]) for r in rows] == [(0, "1x64x64"), (2, "1x32x32")]
    assert all(r["sample"] > r["read"] > 0 and r["collate"] > 0 and r["pin"] > 0 for r in rows)
    assert all(math.isclose(r["total"], r["sample"] + r["collate"] + r["pin"]) for r in rows)
    assert "| level | part (C x H x W) |" in capsys.readouterr().out


def test_views_mode_compares_the_samplers_with_torchvision(capsys):
    """BatchViews' random parameters against torchvision's own draws: every distribution within the 1% critical
    KS distance for its number of draws, a jitter order per sample (two samples share it 1/24 of the time), and
    the two pixel checks printed. kornia's column only where kornia is installed."""
    import torch
    assert bench._ks(torch.arange(10.0), torch.arange(10.0)) == 0 and bench._ks(torch.zeros(5), torch.ones(5)) == 1
    draws = bench.main(["views", "--samples", "1024", "--batch", "256"])
    tv, bv = draws["torchvision"], draws["BatchViews"]
    assert tv.shape == bv.shape == (1024, 14)
    for cols in ([2], [3], [4], [5], [8], [13]):                          # crop h, w, angle, jitter, sigma
        a, b = tv[:, cols[0]], bv[:, cols[0]]
        if cols[0] >= 5:  # the samples where the step applies
            a, b = a[(a != 1) & (a != 0)], b[(b != 1) & (b != 0)]
        assert bench._ks(a, b) < 1.63 * math.sqrt(1 / len(a) + 1 / len(b)), cols
    assert abs(bench._same_order(bv, 256) - 1 / 24) < 0.02
    out = capsys.readouterr().out
    assert "| share same jitter order, two jittered samples of one batch |" in out and "checkerboard shrunk" in out
