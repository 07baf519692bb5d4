"""Does the demo's pretraining beat random init on the phantom (docs/learning.md, "The phantom")? For each seed:
`python adam.py --seed S` (the demo preset, nothing else changed), then the frozen measures of adam_cxr/probes.py on
its encoder and on the random init of the same seed, at the cache's 256 px (the scale of level 4's parts) on the first
100 test phantoms, 3 draws of the 3 / 12 probe images. Then the paired difference over seeds (t-test, n = seeds) and,
for the landmarks, over every (seed, test pair, landmark) (Wilcoxon signed-rank).

    python docs/phantom_learning.py --out runs/phantom_learning --seeds 5     # about 6 min a seed on 2 CPU cores

A seed whose run folder holds a finished run is not trained again (an interrupted one resumes), and one whose
measures are saved (seedS/frozen.json) is not measured again: a call continues where the last one stopped.
"""
import argparse
import json
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np

import adam
import data_prep
import eve
from adam_cxr import monitor, probes, runs

KEYS = ("landmark_median_px", "landmark_mean_px", "landmark_within16", "heart@3_dice", "heart@12_dice",
        "heart@3_ap", "heart@12_ap")
SIZE, TEST_IMAGES, DRAWS = 256, 100, 3


def measure(spec, seed, cache):
    """probes.headline of one encoder, and its landmark errors in pixels (test pairs x landmarks)."""
    enc = eve.load_encoder(spec, "resnet18", seed, "cpu")
    res = probes.measure(enc.backbone, cache, SIZE, draws=DRAWS, test_images=TEST_IMAGES, seed=seed, device="cpu")
    return probes.headline(res), (np.asarray(res["landmarks"]["errors"]) * res["landmarks"]["scale"]).tolist()


def one_seed(out, seed, cache):
    run, saved = out / f"seed{seed}", out / f"seed{seed}" / "frozen.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    if (run / "checkpoint.pth").is_file() and not any(run.glob("adam_resnet18_level4*.pth")):
        adam.main(["--resume", str(run)])                                   # an interrupted pretraining
    elif not (run / "checkpoint.pth").is_file():
        adam.main(["--seed", str(seed), "--out", str(run), "--overwrite"])
    rec = dict(seed=seed, stage_ends=[{k: r[k] for k in ("level", "loss", "unif", "pruned", "pos_cos")}
                                      for r in monitor.stage_ends(runs.epoch_records(run))])
    rec["pretrained"], rec["pretrained_errors"] = measure(f"adam:{run}", seed, cache)
    rec["random"], rec["random_errors"] = measure("random", seed, cache)
    runs.write_json(saved, rec)
    return rec


def compare(recs):
    """{key: pretrained and random means over seeds, the paired mean difference, its t-test p over seeds}; the
    landmarks also over every (seed, pair, landmark)."""
    from scipy import stats
    out = {}
    for k in KEYS:
        a, b = (np.array([r[w][k] for r in recs]) for w in ("pretrained", "random"))
        p = float(stats.ttest_rel(a, b).pvalue) if len(recs) > 1 else None
        out[k] = dict(pretrained=a.tolist(), random=b.tolist(), diff=float((a - b).mean()), p_seeds=p,
                      lower_is_better=probes.lower_is_better(k))
    d = np.concatenate([np.ravel(r["pretrained_errors"]) - np.ravel(r["random_errors"]) for r in recs])
    out["landmark_errors_all"] = dict(n=len(d), median_diff=float(np.median(d)), mean_diff=float(d.mean()),
                                      p_wilcoxon=float(stats.wilcoxon(d).pvalue))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=runs.out_folder, default="runs/phantom_learning", help="one run folder per seed")
    p.add_argument("--seeds", type=runs.number(int, 1), default=5, help="pretraining seeds 0 .. N-1")
    args = p.parse_args(argv)
    out = Path(args.out)
    cache = data_prep.open_dataset("phantom", None)
    recs = []
    for seed in range(args.seeds):
        recs.append(one_seed(out, seed, cache))
        print(f"seed {seed}: " + ", ".join(f"{k} {recs[-1]['pretrained'][k]:.3f} (random {recs[-1]['random'][k]:.3f})"
                                           for k in KEYS[:1] + KEYS[3:5]), flush=True)
    res = compare(recs)
    runs.write_json(out / "phantom_learning.json", dict(seeds=args.seeds, size=SIZE, test_images=TEST_IMAGES,
                                                        draws=DRAWS, compare=res,
                                                        stage_ends={r["seed"]: r["stage_ends"] for r in recs}))
    print(f"{'measure':20s} {'random init':>12s} {'pretrained':>11s} {'diff':>8s} {'p (seeds)':>10s}")
    for k in KEYS:
        r = res[k]
        p_text = f"{r['p_seeds']:.2g}" if r["p_seeds"] is not None else "-"
        print(f"{k:20s} {np.mean(r['random']):12.3f} {np.mean(r['pretrained']):11.3f} {r['diff']:+8.3f} {p_text:>10s}")
    a = res["landmark_errors_all"]
    print(f"landmark errors, every (seed, pair, landmark): n {a['n']}, median difference {a['median_diff']:+.2f} px, "
          f"Wilcoxon p {a['p_wilcoxon']:.2g}")


if __name__ == "__main__":
    main()
