"""ablate.py: the smoke scale end to end (every variant pretrained, fine-tuned and measured, tables with paired
statistics), resume without rerunning, the equal step budget and the paired statistics on known numbers."""
import json
import math

import pytest

import ablate


def test_plan_gives_every_variant_the_same_steps():
    for budget, spe in ((300, 21), (6, 4), (3000, 39)):
        for stages in (1, 2, 3, 4, 5):
            if budget % stages == 0:
                e, s = ablate.plan(stages, budget, spe)
                assert stages * e * s == budget and s <= spe
    assert ablate.plan(3, 300, 21) == (5, 20) and ablate.plan(1, 300, 21) == (15, 20)
    assert ablate.plan(4, 300, 21) == (5, 15)


def test_paired_statistics_on_known_numbers():
    a = {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 4.0, (1, 1): 7.0, (2, 0): 3.0}
    b = {(0, 0): 0.0, (0, 1): 1.5, (1, 0): 3.0, (1, 1): 4.0, (9, 9): 100.0}   # (2, 0) and (9, 9) unpaired
    d = ablate.paired(a, b)
    diffs = [1.0, 0.5, 1.0, 3.0]
    from scipy import stats
    assert d["n"] == 4 and d["seeds"] == 2 and d["diff"] == pytest.approx(sum(diffs) / 4)
    assert d["p"] == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue)
    half = stats.t.ppf(0.975, 3) * stats.tstd(diffs) / 2
    assert (d["ci_lo"], d["ci_hi"]) == pytest.approx((d["diff"] - half, d["diff"] + half))
    assert d["p_seed"] == pytest.approx(stats.ttest_rel([1.5, 5.5], [0.75, 3.5]).pvalue)
    assert d["mde"] > 0 and ablate.paired(a, {(5, 5): 1.0}) is None


@pytest.mark.slow
def test_smoke_scale_end_to_end_and_resume(phantom_root, tmp_path, one_thread, capsys):
    out = tmp_path / "abl"
    res = ablate.main(["--out", str(out), "--scale", "smoke", "--data-root", str(phantom_root)])
    state = json.loads((out / "ablation.json").read_text())
    pre = [r for r in state["runs"] if r["kind"] == "pretrain"]
    assert sorted((r["variant"], r["seed"]) for r in pre) == sorted(
        (v, s) for v in ("adam", "no_pp", "no_ad", "moco") for s in (0, 1))
    assert {r["steps"] for r in pre} == {ablate.SCALES["smoke"]["steps"]}     # the same budget for every variant
    assert {r["stages"] for r in pre if r["variant"] in ("moco", "no_ad")} == {1}
    ft = [r for r in state["runs"] if r["kind"] == "finetune"]
    assert len(ft) == 5 * 2 * 2 * 2                                   # variants x seeds x tasks x shots (1 draw)
    assert all(0 <= r["value"] <= 100 for r in ft)
    # the draws differ between pretraining seeds and are the same for every variant of one seed
    assert {(r["seed"], r["draw"]) for r in ft} == {(0, 0), (1, 1)}
    ev = [r for r in state["runs"] if r["kind"] == "eve"]
    assert len(ev) == 10 and all(math.isfinite(r["locality"]) and math.isfinite(r["corr_pair"]) for r in ev)
    md = (out / "ablation.md").read_text()
    for name in ("Adam", "no PP", "no AD", "MoCo-v2", "random"):
        assert f"| {name} |" in md
    for col in ablate.metrics():
        assert col[1] in md
        for v in ("no_pp", "no_ad", "moco", "random"):
            d = res["stats"][col[0]][v]["vs_adam"]
            assert d["n"] == 2 and "p" in d and math.isfinite(d["diff"])
    assert md.count("p_seed=") == 4 * len(ablate.metrics())
    assert (out / "ablation.png").stat().st_size > 10_000
    assert all((out / "pretrain" / f"{v}_seed0" / "curves.png").is_file() for v in ("adam", "moco"))
    # a rerun finds everything recorded and trains nothing
    capsys.readouterr()
    again = ablate.main(["--out", str(out), "--scale", "smoke", "--data-root", str(phantom_root)])
    assert "pretrain adam seed 0" not in capsys.readouterr().out and again["table"] == res["table"]
    with pytest.raises(ValueError, match="--scale smoke"):
        ablate.main(["--out", str(out), "--scale", "cpu", "--data-root", str(phantom_root)])


@pytest.mark.slow
def test_interrupted_pretraining_resumes_from_its_checkpoint(phantom_root, tmp_path, one_thread, monkeypatch):
    from adam_cxr import runs
    cfg, flags = ablate.SCALES["smoke"], ablate.VARIANTS["adam"][1]
    out = tmp_path / "abl"
    folder = out / "pretrain" / "adam_seed0"
    folder.mkdir(parents=True)
    (folder / "junk").write_text("a run stopped before its first checkpoint")
    real, ends = runs.RunFolder.end_of_epoch, []

    def stop_after_the_first_stage(self, record, *a):
        real(self, record, *a)
        ends.append(record)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.RunFolder, "end_of_epoch", stop_after_the_first_stage)
    with pytest.raises(KeyboardInterrupt):
        ablate.pretrain("adam", flags, 0, cfg, phantom_root, out, 4)
    assert not (folder / "junk").exists() and (folder / "checkpoint.pth").is_file() and len(ends) == 1
    monkeypatch.setattr(runs.RunFolder, "end_of_epoch", real)
    seen = []
    monkeypatch.setattr(ablate.adam, "main", lambda argv, main=ablate.adam.main: seen.append(argv) or main(argv))
    rec = ablate.pretrain("adam", flags, 0, cfg, phantom_root, out, 4)
    assert "--resume" in seen[0] and rec["steps"] == cfg["steps"]
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in log] == [(0, 1), (1, 1), (2, 1)]   # each epoch once
