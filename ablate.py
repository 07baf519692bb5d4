"""
The paper's ablations as one command: what the Anatomy Decomposer (AD) and the Purposive Pruner (PP) buy.

    python ablate.py --out runs/ablation --scale cpu          # 2 CPU cores, about 90 min (README)
    python ablate.py --out runs/ablation_gpu --scale gpu      # one GPU (docs/ablation.md: command and estimated time)
    python ablate.py --out /tmp/ablation --scale smoke        # under 3 min on 2 cores: what the tests run
    python ablate.py --out runs/ablation --dry-run            # the plan (runs, step budgets), nothing trained

Every variant is pretrained by adam.main with the same budget of optimisation steps and the same seeds
(paper Sect. 3, Fig. 5; docs/METHOD.md §5):
    Adam       levels 0,2,4, PP at t = 0.8 from level 2 on (the authors' setting)
    no PP      levels 0,2,4, --threshold 1 (the pruner keeps everything)
    no AD      level 0 only, PP on it (--prune-every-level): the pruner without the decomposer
    MoCo-v2    level 0 only, no PP: neither component
    random     no pretraining (torchvision's initialisation)
and with --ladder the granularity ladder of Fig. 5.2 (levels 0,1 / 0,1,2 / 0,1,2,3 / 0,1,2,3,4, PP on; its
first rung, level 0 alone, is the MoCo-v2 row), and with --baselines densecl,vicregl,semgen the paper's
baselines, one stage each, pretrained by baselines.py on the same data, backbone, budget and seeds
(docs/baselines.md). A variant with fewer stages gets more steps per stage, so that every encoder has taken
the same number of steps: plan() picks epochs per stage and steps per epoch whose product is the budget /
stages (each stage has its own cosine schedule, as in adam.py).

Every encoder is then evaluated the same way, through the functions of the other scripts (no subprocess:
adam.main, finetune.main and eve.main return their results):
    frozen       the headline: the frozen-feature measures of adam_cxr/probes.py (docs/learning.md), as eve.py
                 --what frozen takes them: one-shot landmark error, linear probes of the heart and clavicle masks
                 from 3 and 12 images, label AUCs; one value per pretraining seed, the probe images drawn by that
                 seed (the same for every variant), beside the no-look baseline probes.measure returns
    finetune.py  few-shot U-Net segmentation of the phantom heart and clavicles at 3 and 12 shots; each
                 pretraining seed s gets its own draws (finetune seeds s*draws ... s*draws + draws - 1), the
                 same for every variant, so every comparison is paired on (pretraining seed, draw)
    eve.py       landmark locality (k-NN accuracy), compositionality gap, dense correspondence
                 (self and pair, share of cells matched within one cell), one value per pretraining seed
Outputs in OUT: ablation.json (every run, rewritten after each), ablation.md and ablation.png. ablation.md has first
the frozen measures (mean +- std over seeds per variant, the no-look row, the paired difference to Adam and to random
init over seeds), then the few-shot and Eve measures (mean +- std per variant, the paired difference to Adam with its
95% t-interval, the paired t-test p-value over seeds x draws, the same test on per-seed means, and the difference it
could detect), then each run's last epoch and the pruner's activity per level; ablation.png shows the few-shot and
Eve differences. Each run's own folder and log live under OUT/pretrain, OUT/finetune, OUT/eve, OUT/logs. A rerun
skips the runs ablation.json records (frozen measures included) and resumes an interrupted pretraining from its
checkpoint; it must use the same scale, seeds, draws and data (ablation.json records the data's identity,
adam_cxr.runs.data_identity), or is refused naming the flag. The frozen settings are recorded at the first run and
kept by every rerun.
"""
import argparse
import contextlib
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

# As in adam.py: sleeping OpenMP waits, set before torch loads libgomp (BENCHMARKS.md, "an OpenMP pitfall"); with
# spinning waits the fine-tuning's two threads stalled each other on a busy 2-core machine (24 s per epoch, not 2).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

import adam
import data_prep
import eve
import finetune
from adam_cxr import monitor, probes, runs
from adam_cxr.runs import write_atomic
from finetune import paired_test, summarize

VARIANTS = {  # key -> (name in tables, adam.py flags); None = no pretraining
    "adam": ("Adam", ["--levels", "0,2,4"]),
    "no_pp": ("no PP", ["--levels", "0,2,4", "--threshold", "1"]),
    "no_ad": ("no AD", ["--levels", "0", "--prune-every-level"]),
    "moco": ("MoCo-v2", ["--levels", "0", "--threshold", "1"]),
    "random": ("random", None),
}
LADDER = {f"levels_{'-'.join(map(str, range(n + 1)))}": (f"levels {','.join(map(str, range(n + 1)))}",
                                                          ["--levels", ",".join(map(str, range(n + 1)))])
          for n in range(1, 5)}
# The paper's baselines (--baselines): key -> (name in tables, flags); baselines.main trains them (docs/baselines.md)
BASELINES = {"densecl": ("DenseCL", []), "vicregl": ("VICRegL", []), "semgen": ("Semantic Genesis", [])}
TASKS = ("phantom-heart", "phantom-clavicle")
SHOTS = (3, 12)

# Scales. pretrain: adam.py flags besides the variant's (the step budget is `steps`, split by plan());
# finetune / eve: flags of those scripts for every encoder. `phantom`: (images, side) of the generated set.
# frozen: probes.measure's settings for every encoder: the side the images are fed at, the first test images used
# (fewer where the test split is smaller), the draws of the 3 / 12 probe images, and the device (default auto).
SCALES = {
    # the test suite's: every piece runs, nothing is learnt; 2 seeds x 1 draw so that every paired test has n = 2
    "smoke": dict(
        root="data/phantom_smoke", phantom=(48, 64), seeds=2, draws=1, steps=6, arch="resnet18", img_size=32,
        pretrain=["--img-size", "32", "--batch-size", "8", "--queue-size", "64", "--workers", "0",
                  "--val-steps", "1", "--print-freq", "1000", "--device", "cpu"],
        finetune=["--img-size", "32", "--epochs", "1", "--min-iters", "2", "--val-images", "4", "--device", "cpu"],
        eve=["--num-images", "6", "--num-patches", "4", "--parts", "2", "--tsne-points", "20", "--folds", "2",
             "--grid", "4", "--corr-pairs", "2", "--device", "cpu"],
        frozen=dict(size=32, test_images=8, draws=1, device="cpu"),
        baselines=["--expander", "256"]),  # baselines.py flags besides the scale's adam.py ones
    # 2 CPU cores, about 90 min: the demo's pretraining (the demo preset: ResNet-18, 64 px views, batch 32) for its
    # 315 steps; the frozen measures as docs/phantom_learning.py takes them (the cache's 256 px, where the demo's
    # encoder beats random init: docs/learning.md)
    "cpu": dict(
        root="data/phantom", phantom=(1000, 256), seeds=3, draws=2, steps=315, arch="resnet18", img_size=64,
        pretrain=["--print-freq", "1000"],
        finetune=["--epochs", "15", "--min-iters", "4", "--val-images", "32"],
        eve=["--num-images", "30", "--num-patches", "30", "--tsne-points", "100"],
        frozen=dict(size=256, test_images=100, draws=3)),
    # one GPU: ResNet-50 at 128 px, 3000 steps of batch 128 on 5000 phantoms, views made on the GPU (CPU workers
    # could not feed it: BENCHMARKS.md), 5 seeds x 2 draws
    "gpu": dict(
        root="data/phantom_5k", phantom=(5000, 256), seeds=5, draws=2, steps=3000, arch="resnet50", img_size=128,
        pretrain=["--img-size", "128", "--batch-size", "128", "--queue-size", "16384", "--lr", "0.03",
                  "--momentum-ema", "0.99", "--views", "device", "--workers", "4", "--val-steps", "4",
                  "--print-freq", "1000"],
        finetune=["--img-size", "128", "--epochs", "30", "--batch-size", "16", "--min-iters", "8",
                  "--val-images", "64", "--workers", "0"],  # finetune.py's workers restart every epoch
        eve=["--num-images", "100", "--num-patches", "100", "--tsne-points", "300"],
        # the cache's 256 px: at 128 px the clavicles are thinner than a stride-8 cell (docs/learning.md)
        frozen=dict(size=256, test_images=200, draws=5)),
}


def plan(stages, budget, max_steps_per_epoch):
    """(epochs per stage, steps per epoch) with stages x epochs x steps = budget, steps per epoch as large as
    the train split allows. Where budget / stages has no such factorisation, the nearest total below it."""
    per_stage = budget // stages
    for spe in range(min(max_steps_per_epoch, per_stage), 0, -1):
        if per_stage % spe == 0:
            return per_stage // spe, spe
    raise ValueError(f"a budget of {budget} steps cannot give {stages} stages a step each")


# ----------------------------------------------------------------------------- the runs

@contextlib.contextmanager
def logged(path):
    """The scripts' own progress goes to OUT/logs/<run>.log; the console gets one line per run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def stages(flags):
    """The levels a variant trains, one stage each (a baseline: one)."""
    return flags[flags.index("--levels") + 1].split(",") if "--levels" in flags else ["0"]


def pretrain(key, flags, seed, cfg, root, out, max_spe):
    """adam.main (baselines.main for a baseline) on one variant and seed with the scale's step budget -> record."""
    levels = stages(flags)
    epochs, spe = plan(len(levels), cfg["steps"], max_spe)
    folder = out / "pretrain" / f"{key}_seed{seed}"
    argv = ["--data", "phantom", "--data-root", str(root), "--arch", cfg["arch"], *cfg["pretrain"], *flags,
            "--epochs", str(epochs), "--steps-per-epoch", str(spe), "--seed", str(seed), "--out", str(folder)]
    if (folder / "checkpoint.pth").is_file():
        argv += ["--resume", str(folder)]                       # an interrupted run continues where it stopped
    elif folder.exists():
        shutil.rmtree(folder)                                    # stopped before its first checkpoint: start again
    t0 = time.time()
    if key in BASELINES:  # the scale's adam.py flags that the method takes, and the scale's own for baselines
        import baselines
        argv = baselines.flags_for(key, argv + cfg.get("baselines", []))[0]
        summary = baselines.main([key, *argv])
    else:
        summary = adam.main(argv)
    log = runs.epoch_records(folder)
    return dict(kind="pretrain", variant=key, seed=seed, out=str(folder), argv=argv, stages=len(levels),
                epochs=epochs, steps_per_epoch=spe, steps=log[-1]["step"], wall_s=round(time.time() - t0, 1),
                backbones=summary["backbones"], last_epoch=log[-1], last_epoch_per_stage=monitor.stage_ends(log))


def finetune_runs(key, seed, spec, cfg, root, out):
    """finetune.main on one encoder: both tasks, both shot counts, the seed's draws -> records."""
    records = []
    for task in TASKS:
        res = finetune.main(["--task", task, "--data-root", str(root), "--arch", cfg["arch"], "--init",
                             f"{key}={spec}", "--shots", ",".join(map(str, SHOTS)), "--runs", str(cfg["draws"]),
                             "--seed", str(seed * cfg["draws"]), "--save", "none",
                             "--out", str(out / "finetune" / f"{key}_seed{seed}"), *cfg["finetune"]])
        records += [dict(kind="finetune", variant=key, seed=seed, task=task, shots=r["shots"], draw=r["seed"],
                         metric=r["metric"], value=r["value"], epochs=r["epochs"], best_epoch=r["best_epoch"],
                         time_s=r["time_s"]) for r in res["records"]]
    return records


def eve_run(key, seed, spec, cfg, root, out):
    """eve.main on one encoder: locality, compositionality, correspondence -> record."""
    t0 = time.time()
    res = eve.main(["--data", "phantom", "--data-root", str(root), "--arch", cfg["arch"], "--img-size",
                    str(cfg["img_size"]), "--init", f"{key}={spec}", "--seed", str(seed), "--dicom", "none",
                    "--out", str(out / "eve" / f"{key}_seed{seed}"), *cfg["eve"]])["results"][key]
    comp, corr = res["compositionality"], res["correspondence"]
    pct = lambda x: None if x is None else 100 * x      # undefined stays undefined
    return dict(kind="eve", variant=key, seed=seed, wall_s=round(time.time() - t0, 1),
                locality=100 * res["locality"]["knn_accuracy"],
                comp_gap=float(np.mean([comp[n]["gap"] for n in comp])),
                corr_self=pct(corr["self"]["within_one_cell"]), corr_pair=pct(corr["pair"]["within_one_cell"]), raw=res)


def frozen_run(key, seed, spec, cfg, root):
    """The frozen-feature measures on one encoder, as eve.py --what frozen takes them -> record of probes.headline's
    numbers. The encoder is loaded and seeded by eve.load_encoder (a random init is eve's of the same seed); the probe
    images are drawn by the pretraining seed, so every variant of one seed is probed on the same ones."""
    fz, t0 = cfg["frozen"], time.time()
    device = runs.resolve_device(fz.get("device", "auto"))
    cache = data_prep.open_cache(root)
    enc = eve.load_encoder(spec, cfg["arch"], seed, device)
    res = probes.measure(enc.backbone, cache, fz["size"], draws=fz["draws"], test_images=fz["test_images"],
                         seed=seed, device=device)
    return dict(kind="frozen", variant=key, seed=seed, wall_s=round(time.time() - t0, 1), size=fz["size"],
                draws=fz["draws"], test_images=len(cache.rows("test")[:fz["test_images"]]),
                measures=probes.headline(res))


# ----------------------------------------------------------------------------- statistics and reports

def metrics():
    """(column key, title, kind, selector) of every number in the tables."""
    cols = [(f"{t.split('-')[1]}_{s}", f"{t.split('-')[1]} {s}-shot Dice", "finetune",
             lambda r, t=t, s=s: r["task"] == t and r["shots"] == s) for t in TASKS for s in SHOTS]
    return cols + [("locality", "locality k-NN %", "eve", None), ("comp_gap", "compositionality gap", "eve", None),
                   ("corr_self", "correspondence self %", "eve", None),
                   ("corr_pair", "correspondence pair %", "eve", None)]


def frozen_metrics(records):
    """(key, title, "frozen", None) of every headline measure the frozen records hold, in probes.headline's order;
    the no-look keys are the baseline's, not columns of their own."""
    keys = dict.fromkeys(k for r in records if r["kind"] == "frozen" for k in r["measures"] if "nolook" not in k)
    title = lambda k: re.sub(r"within(\d+)", r"share within \1 px", k).replace("_", " ")
    return [(k, title(k), "frozen", None) for k in keys]


def values(records, variant, col):
    """{(pretraining seed, draw): value} of one variant and column; eve and frozen have one unit per seed (draw
    None)."""
    key, _, kind, select = col
    out = {}
    for r in records:
        if r["kind"] == kind and r["variant"] == variant and (select is None or select(r)):
            value = r["value"] if kind == "finetune" else r["measures"].get(key) if kind == "frozen" else r[key]
            if isinstance(value, (int, float)):  # None or an AUC's "undefined: ..." (its record says why): no unit
                out[(r["seed"], r.get("draw"))] = value
    return out


def nolook(records, cols):
    """{key: mean/std over pretraining seeds} of the no-look baseline of each frozen column (probes.nolook). It
    ignores the image, so every encoder of one seed has the same: it is read from the first record of each seed."""
    rows = {}
    for r in records:
        if r["kind"] == "frozen":
            rows.setdefault(r["seed"], r["measures"])
    out = {}
    for key, *_ in cols:
        vals = [v for v in (probes.nolook(m, key) for m in rows.values()) if isinstance(v, (int, float))]
        out[key] = summarize(vals) if vals else None
    return out


def paired(a, b):
    """a - b on their common units: the mean difference with its 95% t-interval, the paired t-test over the
    units (seeds x draws), the same test on per-seed means (draws of one encoder share it, so this is the
    conservative one), and the difference detectable with 80% power at 5% (two-sided) given the observed spread."""
    from scipy import stats
    common = sorted(set(a) & set(b), key=str)
    if not common:
        return None
    d = summarize([a[u] - b[u] for u in common])
    t = paired_test([a[u] for u in common], [b[u] for u in common])
    seeds = sorted({u[0] for u in common})
    per_seed = lambda v: [np.mean([v[u] for u in common if u[0] == s]) for s in seeds]
    ts = paired_test(per_seed(a), per_seed(b))
    n = len(common)
    mde = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * d["std"] / math.sqrt(n) if n > 1 else math.nan
    return dict(n=n, diff=d["mean"], ci_lo=d["ci_lo"], ci_hi=d["ci_hi"], p=t["p"], seeds=len(seeds),
                p_seed=ts["p"], mde=float(mde))


def analyse(records, variants, cols=None, refs=("adam",)):
    """{column key: {variant: {"summary": mean/std/ci, "vs_<ref>": paired(variant, ref) for each ref}}} over the
    columns `cols` (default: the few-shot and Eve ones, metrics()); a variant is not compared with itself."""
    out = {}
    for col in metrics() if cols is None else cols:
        ref = {r: values(records, r, col) for r in refs}
        out[col[0]] = {}
        for v in variants:
            vals = values(records, v, col)
            if vals:
                out[col[0]][v] = dict(summary=summarize(list(vals.values())),
                                      **{f"vs_{r}": None if v == r else paired(vals, ref[r]) for r in refs})
    return out


def fmt(x, d=2):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def name(v):
    """A variant's name in tables."""
    return {**VARIANTS, **LADDER, **BASELINES}[v][0]


def frozen_lines(records, frozen, variants):
    """The headline tables: the frozen measures per variant beside the no-look row, and the paired difference of
    each variant to Adam and to random init over pretraining seeds. frozen: analyse(...) of frozen_metrics() with
    refs adam and random, and "nolook": nolook(...)."""
    stats = frozen["variants"]
    measured = frozen_metrics(records)
    cols = [c for c in measured if stats[c[0]]]       # a measure undefined for every encoder: said, not tabled
    if not cols:
        return ["## Frozen features (headline)", "", "No encoder measured yet."]
    dec = lambda k: 2 if probes.lower_is_better(k) else 3
    better = lambda k: "lower" if probes.lower_is_better(k) else "higher"
    arrow = lambda k: "↓" if probes.lower_is_better(k) else "↑"
    done = [r for r in records if r["kind"] == "frozen"]
    each = lambda k: "/".join(sorted({str(r[k]) for r in done}))    # one value, unless settings changed midway
    lines = ["## Frozen features (headline)", "",
             f"adam_cxr/probes.py on each frozen encoder, as `eve.py --what frozen` (docs/learning.md): images fed at "
             f"{each('size')} px, the first {each('test_images')} test images, {each('draws')} draw(s) of the 3 and 12 "
             f"probe images per pretraining seed. Mean ± std over pretraining seeds (n). ↓ lower is better (pixel "
             f"errors, in pixels of the cache's images), ↑ higher is better. No look ignores the image: each landmark "
             f"at its pixel in the other image, the mean training mask, AUC 0.5."]
    if len(cols) < len(measured):
        lines.append(f"Undefined for every encoder (ablation.json says why): "
                     f"{', '.join(c[1] for c in measured if c not in cols)}.")
    lines += ["", "| variant | n | " + " | ".join(f"{c[1]} {arrow(c[0])}" for c in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    cell = lambda s, k: f"{fmt(s['mean'], dec(k))} ± {fmt(s['std'], dec(k))}" if s else ""
    row = lambda title, n, summary: f"| {title} | {n} | " + " | ".join(cell(summary(k), k) for k, *_ in cols) + " |"
    lines.append(row("no look", len({r["seed"] for r in done}), frozen["nolook"].get))
    for v in variants:
        n = len({r["seed"] for r in done if r["variant"] == v})
        if n:
            lines.append(row(name(v), n, lambda k: stats[k].get(v, {}).get("summary")))
    for ref, ref_name in (("adam", "Adam"), ("random", "random init")):
        others = [v for v in variants if v != ref]
        lines += ["", f"### Frozen features: paired difference to {ref_name}", ""]
        if ref not in variants:
            lines.append(f"{ref_name} is not among --variants: no comparison.")
            continue
        lines += [f"Δ = variant − {ref_name} on the same pretraining seed: mean [95% t-interval], p of the two-sided "
                  f"paired t-test over seeds, n seeds. The variant is better where Δ has the sign of the column "
                  f"\"better\": Δ < 0 for lower, Δ > 0 for higher.", "",
                  "| measure | better | " + " | ".join(name(v) for v in others) + " |",
                  "|---|---|" + "---|" * len(others)]
        for key, title, *_ in cols:
            cells = []
            for v in others:
                d = stats[key].get(v, {}).get(f"vs_{ref}")
                cells.append("" if not d else f"{d['diff']:+.{dec(key)}f} [{fmt(d['ci_lo'], dec(key))}, "
                             f"{fmt(d['ci_hi'], dec(key))}] p={fmt(d['p'], 3)}, n={d['n']}")
            lines.append(f"| {title} | {better(key)} | " + " | ".join(cells) + " |")
    return lines


def pruner_lines(records, variants):
    """Per pretraining run and stage, the last epoch's pruned share and the share of pairs at or above t (the
    pruner's would-be share, also where it is off), from the run's log (the record's last_epoch_per_stage)."""
    lines = ["## Pruner activity per level", "",
             "The last epoch of each stage (the run's log.jsonl): pruned % is the share of bank pairs the pruner "
             "removed (q.b >= t), q.b >= t % the share it would remove, also where it is off (level 0 without "
             "--prune-every-level, --threshold 1). Runs without a pruner (the baselines) are left out.", "",
             "| variant | seed | stage | level | epoch | pruned % | q.b >= t % |", "|---|---|---|---|---|---|---|"]
    order = lambda r: (variants.index(r["variant"]) if r["variant"] in variants else 99, r["seed"])
    for r in sorted((r for r in records if r["kind"] == "pretrain"), key=order):
        for e in r["last_epoch_per_stage"]:
            if "pruned" in e:
                lines.append(f"| {name(r['variant'])} | {r['seed']} | {e['stage']} | {e['level']} | {e['epoch']} | "
                             f"{fmt(100 * e['pruned'])} | {fmt(100 * e.get('would_prune', math.nan))} |")
    return lines


def write_md(path, state, stats, frozen, variants):
    cols = metrics()
    cfg, recs = state["settings"], state["runs"]
    pre = [r for r in recs if r["kind"] == "pretrain"]
    wall = {k: sum(r.get("wall_s", 0) for r in recs if r["kind"] == k) for k in ("pretrain", "frozen", "eve")}
    wall["finetune"] = sum(r["time_s"] for r in recs if r["kind"] == "finetune")
    lines = [f"# Ablation (`--scale {state['scale']}`)", "",
             f"Command: `{' '.join(state['command'])}`; {platform.platform()}, "
             f"{torch.get_num_threads()} torch threads.",
             f"Budget: {cfg['steps']} pretraining steps per variant; pretraining seeds 0-{cfg['seeds'] - 1}, "
             f"{cfg['draws']} few-shot draw(s) per seed; phantom {cfg['phantom'][0]} images at "
             f"{cfg['phantom'][1]} px. Wall time so far: pretraining {wall['pretrain'] / 60:.1f} min, frozen "
             f"measures {wall['frozen'] / 60:.1f} min, fine-tuning {wall['finetune'] / 60:.1f} min, "
             f"Eve {wall['eve'] / 60:.1f} min.", ""]
    lines += frozen_lines(recs, frozen, variants)
    head = "| variant | " + " | ".join(c[1] for c in cols) + " |\n|---|" + "---|" * len(cols)
    lines += ["", "## Secondary: few-shot fine-tuning and Eve", "",
              "### Mean ± std over seeds x draws (n)", "",
              "Few-shot Dice (%) on the phantom test split; Eve per pretraining seed. Higher is better for every "
              "column.", "", head]
    for v in variants:
        cells = []
        for c in cols:
            s = stats[c[0]].get(v, {}).get("summary")
            cells.append(f"{fmt(s['mean'])} ± {fmt(s['std'])} ({s['n']})" if s else "")
        lines.append(f"| {name(v)} | " + " | ".join(cells) + " |")
    lines += ["", "### Paired difference to Adam", "",
              "Δ = variant − Adam on the same (pretraining seed, draw): mean [95% t-interval], p of the two-sided "
              "paired t-test over seeds x draws, p over per-seed means (the draws of one seed share an encoder, "
              "so this one is the conservative test), n pairs, and the Δ this design could detect "
              "(80% power, 5% two-sided, at the observed spread of Δ). Δ < 0: Adam is better.", ""]
    others = [v for v in variants if v != "adam"]
    lines += ["| metric | " + " | ".join(name(v) for v in others) + " |", "|---|" + "---|" * len(others)]
    for c in cols:
        cells = []
        for v in others:
            d = stats[c[0]].get(v, {}).get("vs_adam")
            cells.append("" if not d else f"{d['diff']:+.2f} [{fmt(d['ci_lo'])}, {fmt(d['ci_hi'])}] "
                         f"p={fmt(d['p'], 3)}, p_seed={fmt(d['p_seed'], 3)}, n={d['n']}, detectable ±{fmt(d['mde'])}")
        lines.append(f"| {c[1]} | " + " | ".join(cells) + " |")
    lines += ["", "## Pretraining (last epoch of each run; the monitor's fields, adam_cxr/monitor.py)", "",
              "| variant | seed | stages x epochs x steps | steps | loss | val loss | pruned % | q.b >= t % | "
              "median max q.b | q.b p99 | q.k | align | unif | encoder evaluated | wall s |", "|---|" + "---|" * 14]
    for r in sorted(pre, key=lambda r: (variants.index(r["variant"]) if r["variant"] in variants else 99, r["seed"])):
        e = r["last_epoch"]
        lines.append(f"| {name(r['variant'])} | {r['seed']} | {r['stages']} x {r['epochs']} x {r['steps_per_epoch']} "
                     f"| {r['steps']} | {fmt(e['loss'], 3)} | {fmt(e.get('val_loss'), 3)} | "
                     f"{fmt(100 * e['pruned'] if 'pruned' in e else None)} | "
                     f"{fmt(100 * e.get('would_prune', math.nan))} | "
                     f"{fmt(e.get('sim_max_median'), 3)} | {fmt(e.get('sim_p99'), 3)} | {fmt(e.get('pos_cos'), 3)} | "
                     f"{fmt(e.get('align'), 3)} | {fmt(e.get('unif'), 3)} | "
                     f"{'epoch %d (lowest val loss)' % e['best_epoch'] if e.get('best_epoch') else 'last epoch'} | "
                     f"{fmt(r['wall_s'], 0)} |")
    lines += [""] + pruner_lines(recs, variants)
    text = "\n".join(lines) + "\n"
    write_atomic(path, lambda p: Path(p).write_text(text))
    return text


def write_png(path, records, stats, variants):
    """Per metric, each variant's paired difference to Adam: the mean with its 95% t-interval, every pair in grey."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = metrics()
    others = [v for v in variants if v != "adam"]
    fig, axes = plt.subplots(2, 4, figsize=(4 * 4, 7.5))
    for ax, col in zip(axes.flat, cols):
        ref = values(records, "adam", col)
        for x, v in enumerate(others):
            d = stats[col[0]].get(v, {}).get("vs_adam")
            if not d:
                continue
            vals = values(records, v, col)
            pts = [vals[u] - ref[u] for u in sorted(set(vals) & set(ref), key=str)]
            ax.scatter(x + np.linspace(-0.15, 0.15, len(pts)), pts, s=8, color="grey", alpha=0.6)
            err = [[d["diff"] - d["ci_lo"]], [d["ci_hi"] - d["diff"]]] if not math.isnan(d["ci_lo"]) else None
            ax.errorbar(x, d["diff"], yerr=err, fmt="o", color="C1", capsize=4)
        ax.axhline(0, color="C0", ls="--", lw=0.8)
        ax.set_xticks(range(len(others)), [name(v) for v in others], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{col[1]}: variant − Adam", fontsize=9)
    fig.suptitle("paired difference to Adam on the same seeds and draws: mean and 95% t-interval (grey: every "
                 "pair); below 0: Adam is better", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=90))
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def get_args(argv=None):
    p = runs.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=runs.out_folder, required=True, help="folder for ablation.json/.md/.png and every "
                   "run's files; a rerun into it skips finished runs")
    p.add_argument("--scale", default="cpu", choices=list(SCALES), help="smoke: the tests' (< 3 min, nothing "
                   "learnt); cpu: 2 CPU cores, about 90 min; gpu: one GPU (README)")
    p.add_argument("--ladder", action="store_true", help="also the granularity ladder (levels 0,1 ... 0,1,2,3,4)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="which of Adam's variants to run, comma-separated "
                   "(adam, the reference of every paired test, must be one)")
    p.add_argument("--baselines", default="", help="also the paper's baselines, comma-separated: densecl, vicregl "
                   "(both need pip install '.[baselines]'), semgen (docs/baselines.md)")
    p.add_argument("--data-root", default=None, help="phantom cache to use (default: the scale's, generated "
                   "when missing)")
    p.add_argument("--seeds", type=runs.number(int, 1), default=None,
                   help="pretraining seeds 0..N-1 (default: the scale's)")
    p.add_argument("--draws", type=runs.number(int, 1), default=None,
                   help="few-shot draws per seed (default: the scale's)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their step budgets, run nothing")
    args = p.parse_args(argv)
    for k in ("seeds", "draws"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1")
    for k, known in (("variants", VARIANTS), ("baselines", BASELINES)):
        setattr(args, k, [v for v in getattr(args, k).split(",") if v])
        if set(getattr(args, k)) - set(known):
            p.error(f"--{k}: unknown {', '.join(sorted(set(getattr(args, k)) - set(known)))}; choose from "
                    f"{', '.join(known)}")
    if "adam" not in args.variants:
        p.error("--variants must include adam: every paired test is against it")
    return args


def is_state(s):
    """The shape of ablation.json: what main() reads back from it."""
    return (isinstance(s["scale"], str) and all(isinstance(s["settings"][k], int) for k in ("seeds", "draws"))
            and all(isinstance(r, dict) and {"kind", "variant", "seed"} <= set(r) for r in s["runs"]))


def main(argv=None):
    args = get_args(argv)
    with contextlib.nullcontext() if args.dry_run else runs.locked(args.out, "ablate.py"):  # a dry run writes nothing
        return _main(args, argv)


def _main(args, argv):
    cfg = dict(SCALES[args.scale])
    cfg.update({k: getattr(args, k) for k in ("seeds", "draws") if getattr(args, k) is not None})
    out = Path(args.out)
    variants = args.variants + (list(LADDER) if args.ladder else []) + args.baselines
    flags = {k: v[1] for k, v in {**VARIANTS, **LADDER, **BASELINES}.items()}
    if {"densecl", "vicregl"} & set(args.baselines):              # lightly is an optional extra: one line, now
        import baselines
        baselines.require_lightly(f"--baselines {','.join(args.baselines)}")
    state_path = out / "ablation.json"
    state = runs.read_json(state_path, "--out", "an ablate.py record (scale, settings with seeds and draws, runs)",
                           is_state)
    if state and (state["scale"], state["settings"]["seeds"], state["settings"]["draws"]) != \
            (args.scale, cfg["seeds"], cfg["draws"]):
        raise ValueError(f"--out {out} holds a --scale {state['scale']} ablation with {state['settings']['seeds']} "
                         f"seeds x {state['settings']['draws']} draws: rerun it with those, or choose another --out")
    root = Path(args.data_root or cfg["root"])
    if args.dry_run and not (root / "meta.json").exists():   # not generated yet: its split is known
        n_train = int(round(0.7 * cfg["phantom"][0]))
    else:
        if args.data_root is None:
            data_prep.ensure_phantom(root, num_images=cfg["phantom"][0], size=cfg["phantom"][1], seed=0)
        n_train = len(data_prep.open_cache(root).rows("train"))
    cfg["root"] = str(root)                                  # the data this ablation runs on, and its identity
    cfg["data"] = None if args.dry_run and not (root / "meta.json").exists() else runs.data_identity(root)
    if state and cfg["data"]:                                # a rerun continues on the same data only
        runs.check_data("--data-root", root, state["settings"].get("data"), cfg["data"], f"the ablation in {out}")
    state = state or dict(scale=args.scale, settings=cfg, runs=[])
    state["settings"].setdefault("data", cfg["data"])        # a record from before identities: from now on
    cfg["frozen"] = state["settings"].setdefault("frozen", cfg["frozen"])  # every encoder of one ablation alike
    state["command"] = ["python", "ablate.py", *(sys.argv[1:] if argv is None else argv)]
    batch = int(cfg["pretrain"][cfg["pretrain"].index("--batch-size") + 1]) if "--batch-size" in cfg["pretrain"] \
        else adam.PRESETS["demo"]["batch_size"]
    max_spe = n_train // batch
    seeds = range(cfg["seeds"])
    jobs = [("pretrain", v, s) for s in seeds for v in variants if flags[v] is not None]
    jobs += [(kind, v, s) for s in seeds for v in variants for kind in ("frozen", "finetune", "eve")]
    fz = cfg["frozen"]
    print(f"ablation --scale {args.scale}: {len(variants)} variants x {cfg['seeds']} seeds, {cfg['steps']} "
          f"pretraining steps each; frozen measures (the headline) at {fz['size']} px on up to {fz['test_images']} "
          f"test images, {fz['draws']} probe draw(s); {cfg['draws']} few-shot draw(s) x {len(SHOTS)} shot counts x "
          f"{len(TASKS)} tasks; data {root} ({n_train} train images); logs in {out / 'logs'}", flush=True)
    if args.dry_run:
        for v in variants:
            if flags[v] is not None:
                n = len(stages(flags[v]))
                e, spe = plan(n, cfg["steps"], max_spe)
                print(f"  {v}: {' '.join(flags[v]) or 'baselines.py ' + v}: {n} stage(s) x {e} epochs x {spe} "
                      f"steps = {n * e * spe} steps")
        n_ft = sum(k == "finetune" for k, _, _ in jobs) * len(TASKS) * len(SHOTS) * cfg["draws"]
        print(f"  {sum(k == 'pretrain' for k, _, _ in jobs)} pretraining runs, "
              f"{sum(k == 'frozen' for k, _, _ in jobs)} frozen-feature measurements (adam_cxr/probes.py), "
              f"{n_ft} fine-tuning runs, {sum(k == 'eve' for k, _, _ in jobs)} Eve runs")
        return dict(out=str(out), jobs=jobs)
    done = {(r["kind"], r["variant"], r["seed"]) for r in state["runs"]}
    t_start = time.time()
    for j, (kind, v, s) in enumerate(jobs):
        if (kind, v, s) in done:
            continue
        print(f"[{j + 1}/{len(jobs)}] {kind} {v} seed {s} ...", flush=True)
        t0 = time.time()
        spec = "random" if flags[v] is None else f"adam:{out / 'pretrain' / f'{v}_seed{s}'}"
        with logged(out / "logs" / f"{kind}_{v}_seed{s}.log"):
            if kind == "pretrain":
                new = [pretrain(v, flags[v], s, cfg, root, out, max_spe)]
            elif kind == "frozen":
                new = [frozen_run(v, s, spec, cfg, root)]
            elif kind == "finetune":
                new = finetune_runs(v, s, spec, cfg, root, out)
            else:
                new = [eve_run(v, s, spec, cfg, root, out)]
        state["runs"] += [r | {"data": cfg["data"]} for r in new]
        runs.write_json(state_path, state)
        print(f"[{j + 1}/{len(jobs)}] {kind} {v} seed {s}: {time.time() - t0:.0f}s "
              f"({(time.time() - t_start) / 60:.1f} min so far)", flush=True)
    stats = analyse(state["runs"], variants)
    cols = frozen_metrics(state["runs"])
    frozen = dict(variants=analyse(state["runs"], variants, cols, refs=("adam", "random")),
                  nolook=nolook(state["runs"], cols))
    state["stats"], state["frozen_stats"] = stats, frozen
    runs.write_json(state_path, state)
    text = write_md(out / "ablation.md", state, stats, frozen, variants)
    write_png(out / "ablation.png", state["runs"], stats, variants)
    print(text)
    return dict(out=str(out), stats=stats, frozen=frozen, table=text, runs=state["runs"])


if __name__ == "__main__":  # bad input, a full disk, a busy --out, Ctrl-C or SIGTERM: one line, no traceback
    runs.command_line("ablate.py", main, (OSError, ValueError, data_prep.DataError),
                      note=lambda: f"{Path(get_args().out) / 'ablation.json'} keeps the finished runs: the same command "
                                   f"goes on with the rest (an interrupted pretraining from its checkpoint)")
