"""ablate.py: the smoke scale end to end (every variant pretrained, fine-tuned and measured, tables with paired
statistics, the frozen measures first), resume without rerunning, the equal step budget, the paired statistics and
the frozen tables on known numbers."""
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


def frozen(variant, seed, px, dice, auc):
    """A frozen record as frozen_run writes it; the no-look numbers depend on the seed only, as probes.measure's."""
    return dict(kind="frozen", variant=variant, seed=seed, size=32, test_images=8, draws=1,
                measures={"landmark_median_px": px, "landmark_nolook_median_px": 20.0 + seed,
                          "heart@3_dice": dice, "heart@3_nolook_dice": 0.5, "auc_nodule": auc,
                          "auc_effusion": "undefined: the train images are all negative"})


def test_frozen_tables_on_known_numbers():
    undefined = "undefined: the test images are all negative"
    recs = [frozen("adam", 0, 10.0, 0.6, 0.7), frozen("adam", 1, 12.0, 0.7, undefined),
            frozen("random", 0, 14.0, 0.5, 0.6), frozen("random", 1, 17.0, 0.4, 0.65),
            frozen("moco", 0, 11.0, 0.6, 0.8)]
    cols = ablate.frozen_metrics(recs)
    assert [c[0] for c in cols] == ["landmark_median_px", "heart@3_dice", "auc_nodule", "auc_effusion"]
    look = ablate.nolook(recs, cols)
    assert look["landmark_median_px"]["mean"] == pytest.approx(20.5) and look["auc_nodule"]["mean"] == 0.5
    st = ablate.analyse(recs, ["adam", "moco", "random"], cols, refs=("adam", "random"))
    px = st["landmark_median_px"]
    assert px["adam"]["summary"]["mean"] == pytest.approx(11.0) and px["adam"]["vs_adam"] is None
    assert px["adam"]["vs_random"]["diff"] == pytest.approx(-4.5) and px["adam"]["vs_random"]["n"] == 2
    assert px["moco"]["vs_adam"]["n"] == 1 and px["moco"]["vs_adam"]["diff"] == pytest.approx(1.0)
    assert st["auc_nodule"]["adam"]["summary"]["n"] == 1                    # the undefined AUC is no unit
    text = "\n".join(ablate.frozen_lines(recs, dict(variants=st, nolook=look), ["adam", "moco", "random"]))
    assert "| no look | 2 | 20.50 ± 0.71 | 0.500 ± 0.000 | 0.500 ± 0.000 |" in text
    assert "| Adam | 2 | 11.00 ± 1.41 | 0.650 ± 0.071 | 0.700 ± –" in text
    assert "landmark median px ↓" in text and "heart@3 dice ↑" in text
    assert "Undefined for every encoder (ablation.json says why): auc effusion." in text
    assert "| auc effusion" not in text
    vs_random = text.split("paired difference to random init")[1]
    assert "| landmark median px | lower | -4.50 [" in vs_random and "| heart@3 dice | higher | +0.200 [" in vs_random


@pytest.mark.slow
def test_smoke_scale_end_to_end_and_resume(phantom_root, tmp_path, one_thread, capsys, monkeypatch):
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
    # the frozen measures: one record per encoder, random init included, the no-look numbers the same for every
    # variant of one seed (the same test images and probe draws)
    fz = {(r["variant"], r["seed"]): r for r in state["runs"] if r["kind"] == "frozen"}
    assert sorted(fz) == sorted((v, s) for v in ablate.VARIANTS for s in (0, 1))
    assert all(math.isfinite(r["measures"]["landmark_median_px"]) and r["test_images"] <= 8 for r in fz.values())
    for s in (0, 1):
        assert len({fz[(v, s)]["measures"]["heart@12_nolook_dice"] for v in ablate.VARIANTS}) == 1
    md = (out / "ablation.md").read_text()
    assert md.index("## Frozen features (headline)") < md.index("## Secondary") < md.index("## Pretraining")
    headline = md.split("## Frozen features (headline)")[1].split("\n## ")[0]
    table = headline.split("### ")[0]
    for name in ("no look", "Adam", "no PP", "no AD", "MoCo-v2", "random"):
        assert f"\n| {name} | 2 | " in table
    assert "paired difference to Adam" in headline and "paired difference to random init" in headline
    for v in ("no_pp", "no_ad", "moco"):
        for ref in ("adam", "random"):
            d = res["frozen"]["variants"]["landmark_median_px"][v][f"vs_{ref}"]
            assert d["n"] == 2 and math.isfinite(d["diff"])
    assert "| landmark median px | lower |" in headline and "| heart@12 dice | higher |" in headline
    # the pruner per level: a row per run and stage, from each stage's last epoch; nothing pruned where it is off
    pruner = md.split("## Pruner activity per level")[1]
    rows = [line.split(" | ") for line in pruner.splitlines() if line.startswith("| ") and line[2:4] != "va"]
    assert sorted((r[0][2:], int(r[1]), int(r[3])) for r in rows) == sorted(
        (n, s, lv) for n, levels in (("Adam", (0, 2, 4)), ("no PP", (0, 2, 4)), ("no AD", (0,)), ("MoCo-v2", (0,)))
        for s in (0, 1) for lv in levels)
    assert all(r[5] == "0.00" for r in rows if r[0][2:] in ("no PP", "MoCo-v2") or (r[0][2:] == "Adam" and r[3] == "0"))
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
    # a rerun finds everything recorded, trains and measures nothing
    capsys.readouterr()
    measured = []
    monkeypatch.setattr(ablate.probes, "measure",
                        lambda *a, f=ablate.probes.measure, **k: measured.append(a) or f(*a, **k))
    again = ablate.main(["--out", str(out), "--scale", "smoke", "--data-root", str(phantom_root)])
    assert "pretrain adam seed 0" not in capsys.readouterr().out and again["table"] == res["table"]
    assert measured == []
    # an ablation stopped before one encoder's frozen measures measures that one only, to the same numbers
    state["runs"] = [r for r in state["runs"] if (r["kind"], r["variant"], r["seed"]) != ("frozen", "moco", 1)]
    (out / "ablation.json").write_text(json.dumps(state))
    again = ablate.main(["--out", str(out), "--scale", "smoke", "--data-root", str(phantom_root)])
    assert len(measured) == 1
    redone = [r for r in again["runs"] if (r["kind"], r["variant"], r["seed"]) == ("frozen", "moco", 1)]
    assert len(redone) == 1 and redone[0]["measures"] == pytest.approx(fz[("moco", 1)]["measures"])
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
