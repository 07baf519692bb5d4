"""
The known-answer learning test: does this implementation's pretraining learn what it should? (docs/learning.md)

Pretraining (adam.py, unchanged) runs on a generated set whose answer is known, then a frozen linear probe and a
5-NN vote read the class from pooled features. Each pretraining seed is compared with a random init of the same
seed and with the supervised control (the same backbone, views and steps, trained on the labels); the table gives
means over seeds, the lift over random init, and Welch's t-test over seeds.

Two designs (adam_cxr/shapes.py):
  exemplars (default)  64 patterns of three shapes; pretraining sees 8 identical copies of each, so two images share
                       their class and nothing else; the probes fit and score the patterns at new poses and grey
                       levels, never seen in pretraining. It passes when pretraining lifts both probes well above
                       random init (about 20 points over 3 seeds).
  shapes               8 shape classes, every image with its own layout; kept to reproduce the search of the docs.

    python known_answer.py --out runs/known_answer                      # the documented run (3 seeds, MoCo-v2 stage)
    python known_answer.py --out runs/ka_adam --levels 0,2,4            # Adam's levels
    python known_answer.py --out runs/ka --seeds 0 -- --crop-scale 0.2  # flags after -- go to adam.py

A run folder per seed is kept under --out; a rerun evaluates finished seeds again without retraining them.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

import adam
import data_prep
from adam_cxr import probes, runs, shapes

# The settings of each design (docs/learning.md has the search); flags after -- override them. Both: the demo preset
# at the images' side, shuffle BN over 4 groups, the paper's tau 0.2, no validation. Exemplars: the paper's colour
# jitter, crops of at least 60 % of the image (at 32 px the paper's 20 % leaves too little of a pattern: the loss
# barely moves in the budget), a bank of one batch's keys per 4 patterns (K = 64 for 64 patterns: about one copy of
# the anchor's own pattern among the negatives). Shapes: a bank far smaller than the train split, crops of at least
# half the image, no jitter (with it the loss barely moved).
BOTH = ["--preset", "demo", "--bn-groups", "4", "--temperature", "0.2", "--val-steps", "0"]
FLAGS = {"exemplars": BOTH + ["--queue-size", "64", "--crop-scale", "0.6", "--jitter", "0.4"],
         "shapes": BOTH + ["--queue-size", "256", "--crop-scale", "0.5", "--jitter", "0"]}
EPOCHS = {"exemplars": 35, "shapes": 10}    # 560 steps of batch 32 each


def backbone(arch, path=None, seed=0):
    """A torchvision ResNet with fc = Identity: random init of `seed`, or the exported backbone at `path`."""
    torch.manual_seed(seed)
    bb = torchvision.models.__dict__[arch](weights=None)
    bb.fc = torch.nn.Identity()
    if path is not None:
        bb.load_state_dict(runs.load_checkpoint(path, flag="--out"), strict=True)
    return bb


def probe_rows(cache):
    """(probe train rows, probe test rows). Exemplars: the test split in two halves, every other image of each
    class (pretraining saw none of them; its train images are identical copies). Shapes: train -> test split."""
    if cache.meta.get("dataset") != "exemplars":
        return cache.rows("train"), cache.rows("test")
    te, y = np.asarray(cache.rows("test")), cache.label_matrix().argmax(1)
    nth = np.array([np.sum(y[te[:k]] == y[i]) for k, i in enumerate(te)])  # position within its class
    return te[nth % 2 == 0], te[nth % 2 == 1]


def class_probes(bb, cache, size):
    """Linear-probe and 5-NN accuracy of the class from frozen pooled features (probe_rows: fit -> score)."""
    tr, te = probe_rows(cache)
    y = cache.label_matrix().argmax(1)
    f = probes.pooled_features(bb, cache.images, size)
    return dict(linear=probes.linear_probe(f[tr], y[tr], f[te], y[te]), knn=probes.knn(f[tr], y[tr], f[te], y[te]))


def supervised(flags, cache, seed):
    """The supervised control: the backbone, views, batch, optimiser and number of steps of the pretraining run that
    `flags` (adam.py's) describe, with adam.py's cosine over all its epochs (one stage: the same schedule), trained on
    the class labels through a linear head instead of the contrastive loss. It bounds what the budget can teach:
    where even labels do not lift the frozen probes above random init, a pretraining run of that budget cannot be
    expected to (docs/learning.md)."""
    a = adam.parse_args(flags)
    tr = cache.rows("train")
    images = np.asarray(cache.images)[tr][:, None]                                 # N x 1 x H x W uint8
    y = torch.as_tensor(cache.label_matrix()[tr].argmax(1))
    views = adam.AdamViews(images, 0, a.img_size, crop_scale=a.crop_scale, jitter=a.jitter)
    bb = backbone(a.arch, seed=seed)
    head = torch.nn.Linear(bb(torch.zeros(2, 3, 32, 32)).shape[1], int(y.max()) + 1)
    model = torch.nn.Sequential(bb, head).train()
    lr = a.lr * a.batch_size / 256                                                  # adam.py's linear scaling
    opt = adam.make_optimizer(model, lr, a)                                        # the pretraining's SGD
    steps_per_epoch = min(len(tr) // a.batch_size, a.steps_per_epoch or len(tr))
    g = torch.Generator().manual_seed(seed)
    for epoch in range(a.epochs * len(a.level_list)):                            # as many steps as pretraining
        for group in opt.param_groups:                                            # adam.py's cosine per epoch
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / (a.epochs * len(a.level_list))))
        order = torch.randperm(len(tr), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * a.batch_size:(i + 1) * a.batch_size]
            seeds = torch.randint(2**62, (len(idx),), generator=g)
            x = torch.stack([views[(int(j), int(s))][0] for j, s in zip(idx, seeds)])  # B x 1 x S x S uint8
            loss = torch.nn.functional.cross_entropy(model(adam.imagenet_normalise(x.float().mul_(1 / 255))),
                                                     y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return bb.eval()


def check_run(run, flags):
    """A finished run folder is reused only if adam.py trained it with these flags and on this data; else ValueError
    naming the folder and the settings that differ (a rerun with other flags must not score an old encoder)."""
    saved = runs.read_json(run / "args.json", "--out", "adam.py's args.json (args, data)",
                           lambda o: isinstance(o, dict) and isinstance(o.get("args"), dict))
    if saved is None:
        return
    want = vars(adam.parse_args(flags))
    differ = [k for k, v in saved["args"].items() if k not in ("out", "overwrite", "resume") and want.get(k) != v]
    if saved.get("data", {}).get("sha256") != runs.data_identity(want["data"])["sha256"]:
        differ.append("data")
    if differ:
        raise ValueError(f"--out {run} holds a run with other settings ({', '.join(differ)}): delete it or choose "
                         f"another --out")


def welch(a, b):
    """Two-sided Welch t-test p of mean(a) != mean(b); None with fewer than 2 values a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import ttest_ind
    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/known_answer", help="one pretraining run folder per seed, and the results")
    p.add_argument("--seeds", default="0,1,2", help="pretraining seeds (each compared with a random init of its seed)")
    p.add_argument("--design", choices=list(FLAGS), default="exemplars", help="the known-answer set (see above)")
    p.add_argument("--size", type=runs.number(int, 32), default=32,
                   help="image side of the set and of the views, in pixels")
    p.add_argument("--classes", type=runs.number(int, 2), default=64, help="exemplars: patterns")
    p.add_argument("--copies", type=runs.number(int, 1), default=None,
                   help="exemplars: train copies of each pattern (default 8); shapes: shapes per image (default: 4 "
                        "at 32 px, 8 at 64 px; 1 = one large shape)")
    p.add_argument("--tests", type=runs.number(int, 2), default=20,
                   help="exemplars: test images per pattern, half to fit the probes and half to score them")
    p.add_argument("--images", type=runs.number(int, 100), default=3000, help="shapes: size of the set (60 %% train)")
    p.add_argument("--data-root", default="data/shapes", help="where the set's cache is made (kept for reruns)")
    p.add_argument("--epochs", type=runs.number(int, 1), default=None,
                   help="epochs per level (default: 560 steps of batch 32 at one level: 35 for exemplars, 10 for "
                        "shapes)")
    p.add_argument("--levels", type=runs.levels, default="0",
                   help="adam.py --levels: '0' = the MoCo-v2 stage that every level builds on; '0,2,4' = Adam")
    p.add_argument("--supervised", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the supervised control (same backbone, views and steps, on the labels): what "
                        "the budget can teach at all")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    epochs = args.epochs or EPOCHS[args.design]
    if args.design == "exemplars":
        copies = args.copies or 8
        root = shapes.build_exemplars(Path(args.data_root) / f"exemplars_p{args.classes}_c{copies}_t{args.tests}_"
                                      f"s{args.size}", args.classes, copies, args.tests, args.size)
    else:
        copies = args.copies or shapes.default_copies(args.size)
        root = shapes.build_shapes(Path(args.data_root) / f"n{args.images}_s{args.size}_c{copies}", args.images,
                                   args.size, copies=copies)
    cache = data_prep.open_cache(root)
    rows, t0 = [], time.time()
    for seed in seeds:
        run = out / f"seed{seed}"
        flags = FLAGS[args.design] + ["--data", str(root), "--img-size", str(args.size), "--levels", args.levels,
                                      "--epochs", str(epochs), "--seed", str(seed), "--out", str(run),
                                      "--overwrite"] + extra
        if any(run.glob("adam_resnet18_level*.pth")):
            check_run(run, flags)
        else:
            adam.main(flags)
        path, _ = runs.backbone_file(run, "resnet18", "last")       # the demo preset's backbone
        log = runs.read_log(run)
        rows.append(dict(seed=seed, trained=class_probes(backbone("resnet18", path), cache, args.size),
                         random=class_probes(backbone("resnet18", seed=seed), cache, args.size),
                         unif=[r.get("unif") for r in log], pruned=[r.get("pruned") for r in log]))
        if args.supervised:   # kept beside the run: a rerun with the same flags reuses it
            saved = runs.read_json(run / "supervised.json", "--out", "a supervised control (flags, probes)",
                                   lambda o: isinstance(o, dict) and "probes" in o) or {}
            if saved.get("flags") != flags:
                saved = dict(flags=flags, probes=class_probes(supervised(flags, cache, seed), cache, args.size))
                runs.write_json(run / "supervised.json", saved)
            rows[-1]["supervised"] = saved["probes"]
        print(f"seed {seed}: " + ", ".join(f"{k} {rows[-1][k]}" for k in ("random", "supervised", "trained")
                                            if k in rows[-1]), flush=True)
    result = {"settings": dict(vars(args), epochs=epochs, flags=FLAGS[args.design] + extra, data=str(root)),
              "seeds": rows, "summary": {}, "minutes": round((time.time() - t0) / 60, 1)}
    fit, score = probe_rows(cache)
    classes = len(cache.meta["label_names"])
    print(f"\nknown answer ({args.design}): probes fit on {len(fit)} and scored on {len(score)} images, {classes} "
          f"classes (chance {1 / classes:.3f}), {len(seeds)} seed(s)")
    print(f"{'probe':<8} {'random init':>12} {'supervised':>11} {'pretrained':>11} {'lift':>7} {'p (Welch)':>10}")
    for probe in ("linear", "knn"):
        a = [r["trained"][probe] for r in rows]
        b = [r["random"][probe] for r in rows]
        sup = [r["supervised"][probe] for r in rows if "supervised" in r]
        pval = welch(a, b)
        result["summary"][probe] = dict(random=float(np.mean(b)), trained=float(np.mean(a)),
                                        lift=float(np.mean(a) - np.mean(b)), p=pval,
                                        supervised=float(np.mean(sup)) if sup else None)
        print(f"{probe:<8} {np.mean(b):>12.3f} {f'{np.mean(sup):.3f}' if sup else '-':>11} {np.mean(a):>11.3f} "
              f"{np.mean(a) - np.mean(b):>+7.3f} {'-' if pval is None else f'{pval:.2g}':>10}")
    runs.write_atomic(out / "known_answer.json", lambda f: f.write_text(json.dumps(result, indent=1)))
    return result


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, data_prep.DataError) as e:
        sys.exit(f"known_answer.py: error: {e}")
