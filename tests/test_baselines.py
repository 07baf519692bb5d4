"""The paper's baselines (baselines.py, semgen.py; docs/METHOD.md §10-11): each loss against a case computed by hand,
Models Genesis' transformations against their definitions, self-discovery, the equal terms (backbone init, flags,
exports, resume) and the smoke ablation with every method beside Adam, MoCo-v2 and random init."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import adam
import baselines
import semgen
from helpers import ROOT

# DenseCL and VICRegL are lightly's pieces: the [baselines] extra, which `make test` installs
needs_lightly = pytest.mark.skipif(importlib.util.find_spec("lightly") is None,
                                   reason="lightly is the [baselines] extra: pip install '.[baselines]'")


def tiny(method, root, out, *more):
    """A run of a few steps: ResNet-18 on 32 px views, batch 4."""
    return [method, "--data", "phantom", "--data-root", str(root), "--arch", "resnet18", "--img-size", "32",
            "--batch-size", "4", "--workers", "0", "--val-steps", "1", "--print-freq", "100", "--device", "cpu",
            "--steps-per-epoch", "2", "--out", str(out), *more] + {
        "densecl": ["--queue-size", "16"], "vicregl": ["--expander", "64"],
        "semgen": ["--classes", "6", "--neighbours", "8", "--val-neighbours", "4"]}[method]


# ---- DenseCL ------------------------------------------------------------------------------------

@needs_lightly
def test_densecl_loss_by_hand():
    """tau = 0.5, one image, two cells, one entry in each bank. Global: q = k = e1, bank e2: logits (2, 0).
    Dense: the key's backbone features are the query's with the cells swapped, so each query cell's positive is the
    key's dense vector at the other cell: cell 0 gets e1 = q_0 (logit 2) against bank -e1 (logit -2), cell 1 gets
    e2 = q_1 (logit 2) against -e1 (logit 0)."""
    from lightly.loss import NTXentLoss
    crit_g, crit_d = NTXentLoss(0.5, memory_bank_size=(1, 2)), NTXentLoss(0.5, memory_bank_size=(1, 2))
    crit_g.memory_bank.bank.copy_(torch.tensor([[0.0, 1.0]]))
    crit_d.memory_bank.bank.copy_(torch.tensor([[-1.0, 0.0]]))
    e = torch.eye(2)
    q = e[:1].clone().requires_grad_()                                     # B x D
    q_dense = e[None].clone().requires_grad_()                             # B x hw x D: cell 0 = e1, cell 1 = e2
    f_q, f_k = e[None], e.flip(0)[None]                                    # key features: cells swapped
    k_dense = e.flip(0)[None]                                              # key cell 0 = e2, cell 1 = e1
    loss, parts = baselines.densecl_loss(f_q, q, q_dense, f_k, e[:1], k_dense, crit_g, crit_d, 0.5)
    l_global = math.log(1 + math.exp(-2))
    l_dense = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(-2))) / 2
    assert parts["loss_global"] == pytest.approx(l_global, abs=1e-6)
    assert parts["loss_dense"] == pytest.approx(l_dense, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * l_global + 0.5 * l_dense, abs=1e-6)
    # the keys entered the banks after the loss (MoCo's order): k, and the first of the matched dense keys (e1; the
    # bank holds one, and lightly's ring keeps the head of a batch that overflows it)
    assert torch.equal(crit_g.memory_bank.bank, e[:1]) and torch.equal(crit_d.memory_bank.bank, e[:1])


def densecl(seed=0, **kw):
    args = SimpleNamespace(arch="resnet18", dim=16, bn_groups=2, batch_size=4, queue_size=16, temperature=0.2,
                           momentum_ema=0.9, dense_weight=0.5, img_size=32, **kw)
    torch.manual_seed(seed)
    return baselines.DenseCL(args)


@needs_lightly
def test_densecl_teacher_keys_come_back_in_batch_order_and_follow_the_student():
    model = densecl().eval()             # eval: BN on running statistics, so the shuffle alone must not matter
    x = torch.randn(4, 3, 32, 32)
    perm = adam.shuffle_groups(4, 2)
    direct = model.embed(model.teacher, x)
    shuffled = model.embed(model.teacher, x[perm])
    for a, b in zip(direct, shuffled):
        assert torch.allclose(a, b[perm.argsort()], atol=1e-6)
    t0 = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.head_global.parameters():
            p.add_(1.0)
    model.after_step()                                                   # xi <- 0.9 xi + 0.1 theta
    student = [*model.backbone.parameters(), *model.head_global.parameters(), *model.head_dense.parameters()]
    for old, new, theta in zip(t0, model.teacher.parameters(), student):
        assert torch.allclose(new, 0.9 * old + 0.1 * theta, atol=1e-6)


# ---- VICRegL ------------------------------------------------------------------------------------

@needs_lightly
def test_vicregl_loss_by_hand():
    """Two views of two images, 2-d embeddings, one cell per map, local features = global ones.
    z_a = ((1, 0), (-1, 0)), z_b = z_a + (0.1, 0): invariance = mean of (0.1^2, 0, 0.1^2, 0) = 0.005; variance: dim 0
    has std sqrt(2 + 1e-4) > 1 (no cost), dim 1 std sqrt(1e-4) = 0.01, cost 0.99, mean 0.495; covariance: 0.
    Global: 25 * 0.005 + 25 * 0.495 = 12.5. Local: with one cell every match is that cell, by features and by
    location alike: each is VICReg(25, 25, 0.5) = 12.5, so each ordered pair of views costs 12.5 + 12.5 = 25.
    VICRegL: 0.75 * 12.5 + 0.25 * 25 = 15.625."""
    torch.manual_seed(0)
    model = baselines.VICRegL(SimpleNamespace(arch="resnet18", alpha=0.75, expander=None, img_size=32))
    z_a = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    z_b = z_a + torch.tensor([0.1, 0.0])
    grid = torch.zeros(2, 1, 1, 2)
    loss = model.loss([(z_a, z_a.view(2, 1, 1, 2)), (z_b, z_b.view(2, 1, 1, 2))], [grid, grid])
    assert loss.item() == pytest.approx(15.625, abs=1e-5)
    # the global term alone (alpha = 1) is 12.5
    model.criterion.alpha = 1.0
    assert model.loss([(z_a, z_a.view(2, 1, 1, 2)), (z_b, z_b.view(2, 1, 1, 2))], [grid, grid]).item() == \
        pytest.approx(12.5, abs=1e-5)


@pytest.mark.parametrize("size", [32, 64, 100, 224])
def test_feature_side_is_the_resnet_map_side(size):
    backbone = adam.Encoder("resnet18", 8).backbone.eval()
    with torch.no_grad():
        assert adam.feature_map(backbone, torch.zeros(1, 3, size, size)).shape[-1] == baselines.feature_side(size)


@pytest.mark.slow
@needs_lightly
def test_vicregl_views_match_their_grids(phantom_root):
    import data_prep
    images = data_prep.open_images("phantom", str(phantom_root), "train")
    views = baselines.VICRegLViews(images, 64)
    v1, v2, g1, g2 = views[(0, 7)]
    again = views[(0, 7)]
    assert all(torch.equal(a, b) for a, b in zip((v1, v2, g1, g2), again))      # the seed decides the sample
    assert v1.shape == v2.shape == (3, 64, 64) and g1.shape == g2.shape == (2, 2, 2)
    for g in (g1, g2):   # cell centres in image pixels: x grows along columns, y along rows (never flipped)
        assert (g > 0).all() and (g[:, 1, 0] > g[:, 0, 0]).all() and (g[1, :, 1] > g[0, :, 1]).all()
        assert torch.equal(g[0, :, 0], g[1, :, 0]) and torch.equal(g[:, 0, 1], g[:, 1, 1])


# ---- Semantic Genesis: Models Genesis' transformations -------------------------------------------

def test_bezier_curve_by_hand():
    """B(t) = sum_i C(3, i) t^(3-i) (1-t)^i P_i: P_3 at t = 0, P_0 at t = 1, (P_0 + 3 P_1 + 3 P_2 + P_3) / 8 at 1/2."""
    p = [(0.0, 0.0), (0.2, 0.9), (0.7, 0.1), (1.0, 1.0)]
    xs, ys = semgen.bezier_curve(p, n=3)
    assert (xs[0].item(), ys[0].item()) == pytest.approx((1.0, 1.0))
    assert (xs[2].item(), ys[2].item()) == pytest.approx((0.0, 0.0))
    assert (xs[1].item(), ys[1].item()) == pytest.approx(((3 * 0.2 + 3 * 0.7 + 1) / 8, (3 * 0.9 + 3 * 0.1 + 1) / 8))


def test_interp_is_numpys():
    g = torch.Generator().manual_seed(0)
    xp = torch.rand(50, generator=g, dtype=torch.float64).sort().values
    xp[10] = xp[11]                                                          # a tie, as sorted curve values have
    fp = torch.rand(50, generator=g, dtype=torch.float64)
    x = torch.rand(1000, generator=g, dtype=torch.float64) * 1.4 - 0.2      # also outside [xp_0, xp_end]
    assert np.allclose(semgen.interp(x, xp, fp).numpy(), np.interp(x.numpy(), xp.numpy(), fp.numpy()), atol=1e-12)


def test_intensity_curve_on_the_diagonal_is_identity_or_inversion():
    """Control points on the diagonal make the Bezier curve the line y = x: the map is v (no flip) or 1 - v."""
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(1))
    same = semgen.intensity_curve(x, (1 / 3, 1 / 3), (2 / 3, 2 / 3), flip=False)
    inverted = semgen.intensity_curve(x, (1 / 3, 1 / 3), (2 / 3, 2 / 3), flip=True)
    assert torch.allclose(same, x, atol=1e-5) and torch.allclose(inverted, 1 - x, atol=1e-5)


def test_intensity_curve_is_monotone_and_keeps_the_range():
    g = torch.Generator().manual_seed(2)
    v = torch.linspace(0, 1, 201).view(1, 1, -1)
    for _ in range(5):
        p1, p2 = torch.rand(2, 2, generator=g, dtype=torch.float64).tolist()
        up, down = (semgen.intensity_curve(v, p1, p2, flip) for flip in (False, True))
        assert (up.diff() >= -1e-6).all() and (down.diff() <= 1e-6).all()
        assert (up[..., 0].item(), up[..., -1].item()) == pytest.approx((0, 1), abs=1e-4)
        assert (down[..., 0].item(), down[..., -1].item()) == pytest.approx((1, 0), abs=1e-4)


def test_local_shuffling_blocks_and_their_permutations():
    assert semgen.shuffle_count(64, 64) == 625           # Models Genesis' coverage, 1.87, in 64 x 64 (mean block 3.5^2)
    g = torch.Generator().manual_seed(3)
    blocks = semgen.shuffle_blocks(40, 30, g)
    assert len(blocks) == semgen.shuffle_count(40, 30)
    assert all(1 <= h <= 4 and 1 <= w <= 3 and 0 <= t <= 40 - h and 0 <= l <= 30 - w for t, l, h, w in blocks)
    x = torch.rand(2, 40, 30, generator=g)
    out = semgen.local_pixel_shuffling(x, [(5, 6, 4, 3)], g)
    inside = torch.zeros(40, 30, dtype=torch.bool)
    inside[5:9, 6:9] = True
    assert torch.equal(out[:, ~inside], x[:, ~inside])
    a, b = x[:, 5:9, 6:9].reshape(2, -1), out[:, 5:9, 6:9].reshape(2, -1)
    order = a[0].argsort()
    assert torch.equal(a[0].sort().values, b[0].sort().values)                # a permutation of the block's pixels,
    assert torch.equal(a[:, order], b[:, b[0].argsort()])                      # the same one in every channel
    # overlapping blocks read the original, not what an earlier block wrote
    out = semgen.local_pixel_shuffling(x, [(0, 0, 2, 2), (0, 0, 2, 2)], g)
    assert torch.equal(out[0, :2, :2].flatten().sort().values, x[0, :2, :2].flatten().sort().values)


def test_in_and_out_painting_boxes_and_paint():
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        for box in semgen.inpaint_boxes(60, 42, g):
            t, l, h, w = box
            assert 10 <= h <= 20 and 7 <= w <= 14 and 3 <= t <= 60 - h - 3 and 3 <= l <= 42 - w - 3
        out = semgen.outpaint_boxes(60, 42, g)
        assert 1 <= len(out) <= 5
        for t, l, h, w in out:
            assert 60 - 34 <= h <= 60 - 25 and 42 - 24 <= w <= 42 - 18 and 3 <= t <= 60 - h - 3 and 3 <= l <= 42 - w - 3
    assert max(len(semgen.inpaint_boxes(60, 42, g)) for _ in range(50)) <= 5
    x, noise = torch.zeros(1, 10, 10), torch.ones(1, 10, 10)
    boxes = [(1, 1, 2, 3), (5, 5, 2, 2)]
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[1:3, 1:4] = mask[5:7, 5:7] = True
    assert torch.equal(semgen.paint(x, boxes, noise, inside=True)[0], mask.float())      # in-painting: the boxes
    assert torch.equal(semgen.paint(x, boxes, noise, inside=False)[0], (~mask).float())  # out-painting: the rest


def test_genesis_transform_applies_each_of_the_four():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 32, 32, generator=g)
    seen = set()
    for _ in range(24):
        y, which = semgen.genesis_transform(x, g)
        seen.add(which)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
        if which == 1:   # a monotone map of the intensities: y in the order of x only rises, or only falls
            d = y.flatten()[x.flatten().argsort()].diff()
            assert (d >= -1e-6).all() or (d <= 1e-6).all()
        if which == 0:   # shuffling moves pixels, never makes new values
            assert torch.isin(y, x).all() and not torch.equal(y, x)
    assert seen == {0, 1, 2, 3}


# ---- Semantic Genesis: discovery, crops, loss -----------------------------------------------------

def test_semgen_loss_by_hand():
    """CE of logits (0, ln 3) for class 1 = -ln(3/4); MSE of (0.5, 0.5) to (0, 1) = 0.25."""
    logits, labels = torch.tensor([[0.0, math.log(3)]]), torch.tensor([1])
    loss, parts = semgen.semgen_loss(logits, labels, torch.full((1, 1, 1, 2), 0.5), torch.tensor([[[[0.0, 1.0]]]]),
                                     lambda_cls=0.01, lambda_rec=1.0)
    assert loss.item() == pytest.approx(0.01 * math.log(4 / 3) + 0.25, abs=1e-7)
    assert parts["cls_loss"] == pytest.approx(0.01 * math.log(4 / 3)) and parts["cls_acc"] == 1.0


def test_nearest_by_hand():
    f = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    assert semgen.nearest(f, f[0], 3) == [0, 2, 3]


@pytest.mark.slow
def test_self_discovery_and_the_pattern_crops(phantom_root, tmp_path):
    import data_prep
    train = data_prep.open_images("phantom", str(phantom_root), "train")
    val = data_prep.open_images("phantom", str(phantom_root), "val")
    args = SimpleNamespace(classes=5, neighbours=6, val_neighbours=3, patch=0.25, seed=0, discovery="random",
                           arch="resnet18", img_size=32)
    found = semgen.discover(args, train, val, "cpu", say=lambda *a: None)
    assert found == semgen.discover(args, train, val, "cpu", say=lambda *a: None)       # seeded
    assert len(set(found["references"])) == 5                                  # a reference per class, none reused
    assert all(nb[0] == r and len(nb) == 6 for nb, r in zip(found["train"], found["references"]))
    assert all(len(nb) == min(3, len(val)) for nb in found["val"])
    assert all(0 <= t <= 0.75 and 0 <= l <= 0.75 for t, l in found["coords"])
    crops = semgen.PatternCrops(train, found["train"], found["coords"], 0.25, 32)
    assert len(crops) == 30
    H, W = train[0].shape[1:]
    sides = []
    for seed in range(30):
        top, left, h, w = crops.box(seed % 5, H, W, torch.Generator().manual_seed(seed))
        assert 0 <= top <= H - h and 0 <= left <= W - w
        sides.append(h / (0.25 * H))
    assert min(sides) >= 50 / 64 - 0.05 and max(sides) <= 80 / 64 + 0.05 and 1.0 in sides  # the pattern's own, too
    x, y, c = crops[(7, 11)]
    assert x.shape == (3, 32, 32) and y.shape == (1, 32, 32) and c == 1 and 0 <= y.min() and y.max() <= 1


# ---- the equal terms: init, flags, exports, resume, the missing extra -------------------------------

@pytest.mark.parametrize("method", [pytest.param("densecl", marks=needs_lightly),
                                    pytest.param("vicregl", marks=needs_lightly), "semgen"])
@pytest.mark.slow
def test_every_method_starts_from_adams_backbone(method, phantom_root, tmp_path):
    args = baselines.parse_args(tiny(method, phantom_root, tmp_path)[1:], method)
    device = torch.device("cpu")
    images = adam.open_data(args, 1, device)
    torch.manual_seed(3)
    model = baselines.build(args, images[0], images[1], None, device, lambda *a: None)
    torch.manual_seed(3)
    reference = adam.Encoder("resnet18", 128).backbone.state_dict()
    got = model.backbone.state_dict()
    assert set(got) == set(reference) - {k for k in reference if k.startswith("fc.")}
    assert all(torch.equal(got[k], reference[k]) for k in got)


@needs_lightly
def test_flags_for_keeps_what_the_method_takes():
    scale = ["--img-size", "32", "--queue-size", "64", "--gpu-views", "--momentum-ema", "0.99", "--lr", "0.03"]
    assert baselines.flags_for("densecl", scale) == (scale, [])
    assert baselines.flags_for("vicregl", scale) == (["--img-size", "32", "--lr", "0.03"],
                                                     ["--queue-size", "64", "--gpu-views", "--momentum-ema", "0.99"])


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param("densecl", marks=needs_lightly), "semgen"])  # banks; patterns
def test_a_resumed_run_ends_where_the_uninterrupted_one_does(method, phantom_root, tmp_path, one_thread, monkeypatch):
    import finetune
    whole = baselines.main(tiny(method, phantom_root, tmp_path / "whole", "--epochs", "2"))
    real = baselines.end_of_epoch

    def stop_after_the_first_epoch(*a):
        real(*a)
        raise KeyboardInterrupt

    monkeypatch.setattr(baselines, "end_of_epoch", stop_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        baselines.main(tiny(method, phantom_root, tmp_path / "cut", "--epochs", "2"))
    monkeypatch.setattr(baselines, "end_of_epoch", real)
    again = baselines.main(tiny(method, phantom_root, tmp_path / "cut", "--epochs", "2", "--resume",
                                str(tmp_path / "cut")))
    a, b = (torch.load(s["backbones"][0], weights_only=True) for s in (whole, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["step"] == 4
    # the run folder is one that finetune.py / eve.py take as --init adam:RUN, with every backbone key
    from adam_cxr import runs
    backbone = finetune.load_backbone(f"adam:{tmp_path / 'cut'}", "resnet18").state_dict()
    exported = torch.load(runs.backbone_file(tmp_path / "cut", "resnet18")[0], weights_only=True)
    assert backbone.keys() == exported.keys() and all(torch.equal(backbone[k], exported[k]) for k in exported)


@pytest.mark.slow
@needs_lightly
def test_densecl_takes_adams_views_made_on_the_device(phantom_root, tmp_path, one_thread):
    """--gpu-views (adam_cxr/gpu_views.py), here on the CPU: the views of a whole batch at once."""
    summary = baselines.main(tiny("densecl", phantom_root, tmp_path, "--gpu-views", "--epochs", "1"))
    assert summary["backbones"] and json.loads((tmp_path / "args.json").read_text())["args"]["gpu_views"]


@pytest.mark.slow
def test_without_lightly_the_baselines_stop_with_one_line(phantom_root, tmp_path, monkeypatch):
    """ablate.py's command line as a user without the extra runs it (lightly hidden from the import system), and
    baselines.py's error, before anything is read or made."""
    argv = ["ablate.py", "--out", "a", "--baselines", "semgen,densecl", "--dry-run"]
    code = (f"import sys, runpy; sys.modules['lightly'] = None; sys.argv = {argv!r}; "
            f"runpy.run_path({str(ROOT / 'ablate.py')!r}, run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}                     # this checkout's scripts, not an installed copy
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=env)
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "--baselines semgen,densecl" in done.stderr and "pip install '.[baselines]'" in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "a").exists()      # stopped before anything
    monkeypatch.setitem(sys.modules, "lightly", None)
    with pytest.raises(ValueError, match=r"^vicregl: .*pip install '\.\[baselines\]'$"):
        baselines.main(tiny("vicregl", phantom_root, tmp_path / "v"))
    assert not (tmp_path / "v").exists()


# ---- the smoke ablation with the baselines ---------------------------------------------------------

@pytest.mark.slow
@needs_lightly
def test_smoke_ablation_lists_every_baseline_beside_adam_moco_and_random(phantom_root, tmp_path, one_thread):
    import ablate
    out = tmp_path / "abl"
    res = ablate.main(["--out", str(out), "--scale", "smoke", "--data-root", str(phantom_root),
                       "--variants", "adam,moco,random", "--baselines", "densecl,vicregl,semgen"])
    state = json.loads((out / "ablation.json").read_text())
    pre = [r for r in state["runs"] if r["kind"] == "pretrain"]
    methods = ("adam", "moco", "densecl", "vicregl", "semgen")
    assert sorted((r["variant"], r["seed"]) for r in pre) == sorted((v, s) for v in methods for s in (0, 1))
    assert {r["steps"] for r in pre} == {ablate.SCALES["smoke"]["steps"]}     # the same budget for every method
    assert "--queue-size" not in next(r for r in pre if r["variant"] == "vicregl")["argv"]
    md = (out / "ablation.md").read_text()
    for name in ("Adam", "MoCo-v2", "random", "DenseCL", "VICRegL", "Semantic Genesis"):
        assert f"| {name} |" in md
    for col in ablate.metrics():
        for v in ("moco", "random", "densecl", "vicregl", "semgen"):
            d = res["stats"][col[0]][v]["vs_adam"]
            assert d["n"] == 2 and math.isfinite(d["diff"])
    assert md.count("p_seed=") == 5 * len(ablate.metrics())
    assert (out / "ablation.png").stat().st_size > 10_000
