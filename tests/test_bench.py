"""bench.py: the loss table on a tiny shape (every CPU path, flags named as adam.py's) and the input-pipeline
mode on the tiny phantom. Timings are printed, never asserted; these tests check that the modes run and say
what they measured."""
import pytest

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
    for extra in ([], ["--gpu-views"]):
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
