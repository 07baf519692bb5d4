"""
The known-answer learning test: does this implementation's pretraining learn structure at all? (docs/learning.md)

Pretraining (adam.py, unchanged) runs on the shapes set of adam_cxr/shapes.py: textures of one of 8 shape classes,
each image with its own grey levels, sizes and rotations. The class is the only thing two images share, so a frozen
linear probe (and k-NN) of the class lifts above a random init only if pretraining learned the shapes. Each
pretraining seed is compared with a random init of the same seed; the table gives means over seeds, the lift, and
Welch's t-test over seeds.

    python known_answer.py --out runs/known_answer                      # the documented run (3 seeds, MoCo-v2 stage)
    python known_answer.py --out runs/ka_adam --levels 0,2,4            # Adam's levels
    python known_answer.py --out runs/ka --seeds 0 -- --jitter 0.4      # flags after -- go to adam.py

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

# The settings of the test (docs/learning.md has the search): the demo preset at the images' side, a bank far smaller
# than the train split (K << N: no older key of the anchor's own image among the negatives), shuffle BN over 4
# groups, crops of at least half the image and no colour jitter (with MoCo v2's jitter the loss barely moves at this
# scale). Flags after -- override them.
FLAGS = ["--preset", "demo", "--queue-size", "256", "--bn-groups", "4", "--crop-scale", "0.5", "--jitter", "0",
         "--val-steps", "0"]


def backbone(arch, path=None, seed=0):
    """A torchvision ResNet with fc = Identity: random init of `seed`, or the exported backbone at `path`."""
    torch.manual_seed(seed)
    bb = torchvision.models.__dict__[arch](weights=None)
    bb.fc = torch.nn.Identity()
    if path is not None:
        bb.load_state_dict(runs.load_checkpoint(path, flag="--out"), strict=True)
    return bb


def class_probes(bb, cache, size):
    """Linear-probe and 5-NN accuracy of the shape class from frozen pooled features (train split -> test split)."""
    tr, te = cache.rows("train"), cache.rows("test")
    y = cache.label_matrix().argmax(1)
    f = probes.pooled_features(bb, cache.images, size)
    return dict(linear=probes.linear_probe(f[tr], y[tr], f[te], y[te]), knn=probes.knn(f[tr], y[tr], f[te], y[te]))


def supervised(flags, cache, seed):
    """The supervised control: the backbone, views, batch, optimiser, schedule and number of steps of the pretraining
    run that `flags` (adam.py's) describe, trained on the class labels through a linear head instead of the
    contrastive loss. It bounds what the budget can teach: where even labels do not lift the frozen probes above
    random init, a pretraining run of that budget cannot be expected to (docs/learning.md)."""
    a = adam.parse_args(flags)
    tr = cache.rows("train")
    images = np.asarray(cache.images)[tr][:, None]                                 # N x 1 x H x W uint8
    y = torch.as_tensor(cache.label_matrix()[tr].argmax(1))
    views = adam.AdamViews(images, 0, a.img_size, crop_scale=a.crop_scale, jitter=a.jitter)
    bb = backbone(a.arch, seed=seed)
    head = torch.nn.Linear(bb(torch.zeros(2, 3, 32, 32)).shape[1], int(y.max()) + 1)
    model = torch.nn.Sequential(bb, head).train()
    lr = a.lr * a.batch_size / 256                                                  # adam.py's linear scaling
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=a.momentum, weight_decay=a.wd)
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
    p.add_argument("--images", type=runs.number(int, 100), default=3000, help="size of the shapes set (60 %% train)")
    p.add_argument("--size", type=runs.number(int, 32), default=32,
                   help="image side of the shapes set and of the views, in pixels")
    p.add_argument("--copies", type=runs.number(int, 1), default=None,
                   help="shapes per image (default: 4 at 32 px, 8 at 64 px); 1 = one large shape")
    p.add_argument("--data-root", default="data/shapes", help="where the shapes cache is made (kept for reruns)")
    p.add_argument("--epochs", type=runs.number(int, 1), default=10, help="epochs per level")
    p.add_argument("--levels", type=runs.levels, default="0",
                   help="adam.py --levels: '0' = the MoCo-v2 stage that every level builds on; '0,2,4' = Adam")
    p.add_argument("--supervised", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the supervised control (same backbone, views and steps, on the labels): what "
                        "the budget can teach at all")
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    copies = args.copies or shapes.default_copies(args.size)
    root = shapes.build_shapes(Path(args.data_root) / f"n{args.images}_s{args.size}_c{copies}", args.images, args.size,
                               copies=copies)
    cache = data_prep.open_cache(root)
    rows, t0 = [], time.time()
    for seed in seeds:
        run = out / f"seed{seed}"
        flags = FLAGS + ["--data", str(root), "--img-size", str(args.size), "--levels", args.levels,
                         "--epochs", str(args.epochs), "--seed", str(seed), "--out", str(run), "--overwrite"] + extra
        if not any(run.glob("adam_resnet18_level*.pth")):
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
    result = {"settings": dict(vars(args), flags=FLAGS + extra, data=str(root)), "seeds": rows, "summary": {},
              "minutes": round((time.time() - t0) / 60, 1)}
    print(f"\nknown answer: {len(cache.rows('test'))} test images, {len(shapes.CLASSES)} classes (chance "
          f"{1 / len(shapes.CLASSES):.3f}), {len(seeds)} seed(s)")
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
