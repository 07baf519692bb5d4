"""The authors' recipe around the method: shuffle BN in one process (adam.SplitBatchNorm, adam.shuffle_groups),
best-validation exports and their choice by finetune.py / eve.py (runs.py), the CUDA random state in the
checkpoint."""
import json
import math
import subprocess
import sys
import types
from collections import Counter

import pytest
import torch
import torchvision

import adam
import finetune
from adam_cxr import runs
from helpers import ROOT, TINY_RUN, make_cxr14, train_tiny


# ---- shuffle BN in one process ------------------------------------------------------------------

def test_split_batchnorm_with_one_group_is_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 4, dtype=torch.float64)
    split, plain = adam.SplitBatchNorm(3, 1).double(), torch.nn.BatchNorm2d(3).double()
    for m in (split, plain):
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-1, 1)
    plain.load_state_dict(split.state_dict())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = split(x1), plain(x2)
    y1.pow(2).sum().backward()
    y2.pow(2).sum().backward()
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad) and torch.equal(split.weight.grad, plain.weight.grad)
    for key, value in plain.state_dict().items():  # running statistics, counter: the same update
        assert torch.equal(split.state_dict()[key], value), key


@pytest.mark.parametrize("G", [2, 4])
def test_split_batchnorm_normalises_each_group_by_its_own_statistics(G):
    """Group g = images g, g+G, ... normalised by their own mean and (biased) variance; the running mean moves to the
    groups' mean (= the batch mean, groups being equal), the running variance to the mean of their unbiased
    variances; eval mode is plain BatchNorm2d on those buffers. float64: only summation order differs (1e-12)."""
    torch.manual_seed(G)
    x = torch.randn(4 * G, 3, 5, 4, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1).double()
    x[G - 1::G] += 2.0                                     # one group far from the others
    bn = adam.SplitBatchNorm(3, G).double()
    y = bn(x)
    expect, means, variances = torch.empty_like(x), [], []
    for g in range(G):
        xs = x[g::G]
        mean, var = xs.mean((0, 2, 3), keepdim=True), xs.var((0, 2, 3), unbiased=False, keepdim=True)
        expect[g::G] = (xs - mean) / torch.sqrt(var + bn.eps)
        means.append(mean.flatten())
        variances.append(xs.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(y, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, 0.1 * torch.stack(means).mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean((0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * torch.stack(variances).mean(0), rtol=0, atol=1e-12)
    assert bn.num_batches_tracked.item() == 1
    plain = torch.nn.BatchNorm2d(3).double()
    plain.load_state_dict(bn.state_dict())
    bn.eval(), plain.eval()
    assert torch.equal(bn(x), plain(x))


@pytest.mark.parametrize("B,G", [(8, 2), (8, 4), (12, 3), (16, 4), (6, 3), (256, 4)])
def test_teacher_groups_mix_every_student_group(B, G):
    perm = adam.shuffle_groups(B, G)
    assert sorted(perm.tolist()) == list(range(B))
    teacher_group = {int(perm[p]): p % G for p in range(B)}            # image -> its group in the teacher's batch
    for h in range(G):
        members = [i for i in range(B) if teacher_group[i] == h]
        from_student = Counter(i % G for i in members)                 # student group g = images g, g+G, ...
        assert len(members) == B // G
        if (B // G) % G == 0:
            assert set(from_student.values()) == {B // G // G} and len(from_student) == G
        if B // G <= G:
            assert set(from_student.values()) == {1}
    assert torch.equal(adam.shuffle_groups(B, 1), torch.arange(B))


def _batchnorm_groups(out, x):
    """Image i -> the images normalised with the same statistics. Each image has two pixels a, b, normalised to
    (a - mean) / std and (b - mean) / std (weight 1, bias 0), which gives back the mean and std it was normalised
    with."""
    std = (x[:, 0, 0, 0] - x[:, 0, 0, 1]) / (out[:, 0, 0, 0] - out[:, 0, 0, 1])
    stats = torch.stack([x[:, 0, 0, 0] - out[:, 0, 0, 0] * std, std], 1)          # B x 2, float64
    same = torch.cdist(stats, stats) < 1e-9
    return {i: frozenset(torch.nonzero(same[i]).flatten().tolist()) for i in range(len(x))}


@pytest.mark.parametrize("G", [1, 2, 4])
def test_a_key_is_normalised_with_other_images_than_its_query(G):
    """Constructed inputs: B = 16 one-channel images of two pixels with distinct values. The student and the
    teacher are one SplitBatchNorm each; from each output the statistics it was normalised with are recovered,
    and images normalised with the same statistics form one BatchNorm group. G > 1: no key's group is its query's
    group; G = 1: both are the whole batch."""
    B = 16
    x = torch.randn(B, 1, 1, 2, generator=torch.Generator().manual_seed(G), dtype=torch.float64) * 3
    student, teacher = adam.SplitBatchNorm(1, G).double(), adam.SplitBatchNorm(1, G).double()
    q_group, k_group = _batchnorm_groups(student(x), x), _batchnorm_groups(adam.teacher_keys(teacher, x, G), x)
    for i in range(B):
        assert q_group[i] == frozenset(range(i % G, B, G))              # the student's group of image i
        assert len(k_group[i]) == B // G and i in k_group[i]
        assert (k_group[i] != q_group[i]) == (G > 1), (i, sorted(q_group[i]), sorted(k_group[i]))
        if G > 1:  # and it holds images of every student group (B/G = G^2 / G here for G = 4, 8 / 2 for G = 2)
            assert len({j % G for j in k_group[i]}) == G


@pytest.mark.slow
def test_bn_groups_trains_and_exports_a_plain_torchvision_backbone(phantom_root, tmp_path):
    s = train_tiny(phantom_root, tmp_path / "g4", "--bn-groups", "4")                  # batch 8: 4 groups of 2
    plain = train_tiny(phantom_root, tmp_path / "g1")                                  # default at batch 8: 1 group
    assert all(torch.isfinite(torch.tensor(st["losses"])).all() for st in s["stages"])
    assert s["stages"][0]["losses"] != plain["stages"][0]["losses"]            # the groups did change the step
    for run in ("g4", "g1"):
        state = torch.load(tmp_path / run / "adam_resnet18_level2.pth", weights_only=True)
        missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
        assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in torch.load(
            tmp_path / "g1" / "adam_resnet18_level2.pth", weights_only=True).items()}
    assert adam.Encoder("resnet18", 8, 4).backbone.bn1.groups == 4


@pytest.mark.slow
def test_bn_groups_that_do_not_split_the_batch_are_one_clear_line(phantom_root, tmp_path):
    cmd = [sys.executable, str(ROOT / "adam.py"), *TINY_RUN, "--data-root", str(phantom_root), "--out",
           str(tmp_path), "--bn-groups", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "adam.py: error: --bn-groups 3 must split the per-process batch 8 into groups of >= 2 images")


# ---- best-validation exports --------------------------------------------------------------------

def _planted_validation(monkeypatch, curve):
    """adam.validate returns the planted losses in turn and records the student's backbone at each call."""
    seen = []

    def fake(student, *args, **kwargs):
        seen.append({k: v.clone() for k, v in student.backbone.state_dict().items()})
        return curve[len(seen) - 1]
    monkeypatch.setattr(adam, "validate", fake)
    return seen


def _equal(state, other):
    return sorted(state) == sorted(other) and all(torch.equal(state[k], other[k]) for k in state)


@pytest.mark.slow
def test_best_export_follows_a_planted_validation_curve(phantom_root, tmp_path, monkeypatch, capsys):
    curve = [3.0, 1.0, 2.0, 5.0, float("nan"), 4.0]        # stage level 0: best epoch 2; level 2: epoch 3 (NaN never)
    seen = _planted_validation(monkeypatch, curve)
    out = tmp_path / "run"
    summary = train_tiny(phantom_root, out, "--epochs", "3", "--steps-per-epoch", "1")
    log = runs.read_log(out)
    assert [r["val_loss"] for r in log][:4] == curve[:4] and [r["best_epoch"] for r in log] == [1, 2, 2, 1, 1, 3]
    load = lambda name: torch.load(out / name, weights_only=True)
    assert _equal(load("adam_resnet18_level0_best.pth"), seen[1])
    assert _equal(load("adam_resnet18_level2_best.pth"), seen[5])
    assert _equal(load("adam_resnet18_level0.pth"), seen[2]) and _equal(load("adam_resnet18_level2.pth"), seen[5])
    assert sorted(summary["best"]) == [0, 2]
    # which file finetune.py / eve.py take (finetune.load_backbone, runs.backbone_file)
    assert runs.backbone_file(out, "resnet18")[0] == out / "adam_resnet18_level2_best.pth"
    assert "epoch 3 of log.jsonl" in runs.backbone_file(out, "resnet18")[1]
    assert runs.backbone_file(out, "resnet18", "last")[0] == out / "adam_resnet18_level2.pth"
    capsys.readouterr()
    model = finetune.load_backbone(f"adam:{out}", "resnet18")
    assert _equal({k: v for k, v in model.state_dict().items()}, seen[5])
    assert f"{out / 'adam_resnet18_level2_best.pth'} (level 2, the epoch with the lowest validation loss" in \
        capsys.readouterr().out
    finetune.load_backbone(f"adam:{out}@last", "resnet18")
    assert f"adam:{out}@last: {out / 'adam_resnet18_level2.pth'} (level 2, last epoch)" in capsys.readouterr().out


@pytest.mark.slow
def test_best_export_survives_a_resume(phantom_root, tmp_path, monkeypatch):
    """The stage's best so far travels in the checkpoint: a worse epoch after the resume does not replace it."""
    seen = _planted_validation(monkeypatch, [2.0, 1.0, 1.5])
    extra = ["--levels", "0", "--epochs", "3", "--steps-per-epoch", "1"]
    real_save = runs.save_checkpoint

    def save_then_die(path, **state):
        real_save(path, **state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(phantom_root, tmp_path, *extra)
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    adam.main(["--resume", str(tmp_path)])
    assert [r["best_epoch"] for r in runs.read_log(tmp_path)] == [1, 2, 2]
    assert _equal(torch.load(tmp_path / "adam_resnet18_level0_best.pth", weights_only=True), seen[1])


@pytest.mark.slow
def test_without_validation_the_last_epoch_is_taken_and_said(tiny_adam_run, capsys):
    """The tiny phantom's val split is smaller than a batch, so there is no validation loss and no best export."""
    assert not list(tiny_adam_run.glob("*_best.pth"))
    assert all(r["best_epoch"] is None for r in runs.read_log(tiny_adam_run))
    path, what = runs.backbone_file(tiny_adam_run, "resnet18")
    assert path == tiny_adam_run / "adam_resnet18_level2.pth" and "validation was off" in what


# ---- random state in the checkpoint ---------------------------------------------------------------

def _args(out, epochs=1):
    return types.SimpleNamespace(resume=str(out), epochs=epochs)


@pytest.mark.slow
def test_cpu_random_state_round_trip(phantom_root, tmp_path):
    train_tiny(phantom_root, tmp_path, "--levels", "0", "--epochs", "2", "--steps-per-epoch", "1")
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert "cuda" not in ckpt["rng"]                           # CUDA was never used in this process
    student, teacher = adam.Encoder("resnet18", 128), adam.Encoder("resnet18", 128)
    bank = adam.MemoryBank(60, 128, "cpu")
    torch.manual_seed(12345)
    runs.resume(_args(tmp_path, 2), student, teacher, bank, lambda *a: None)
    assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])


@pytest.mark.slow
def test_cuda_random_state_is_saved_and_restored(tmp_path, monkeypatch):
    """The CUDA branch on any machine: torch.cuda stands in as two devices with known states."""
    states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    folder = runs.RunFolder(types.SimpleNamespace(out=str(tmp_path), tensorboard=False, arch="resnet18", epochs=1,
                                                  threshold=0.8),
                            loss=adam.loss_record(adam.info_nce))
    net, bank = adam.Encoder("resnet18", 8), adam.MemoryBank(4, 8, "cpu")
    record = dict(stage=0, level=0, epoch=1, step=1, loss=1.0, val_loss=None)
    folder.end_of_epoch(record, net, net, bank, torch.optim.SGD(net.parameters(), lr=0.1), {"backbones": []})
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert [s.tolist() for s in ckpt["rng"]["cuda"]] == [s.tolist() for s in states]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.tolist(), device)))
    runs.resume(_args(tmp_path), net, net, bank, lambda *a: None)
    assert restored == [(states[0].tolist(), 0), (states[1].tolist(), 1)]


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_random_state_round_trip_on_a_gpu(phantom_root, tmp_path):
    train_tiny(phantom_root, tmp_path, "--levels", "0", "--epochs", "2", "--steps-per-epoch", "1", "--device", "cuda")
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    saved = ckpt["rng"]["cuda"]
    torch.cuda.manual_seed_all(999)
    net, bank = adam.Encoder("resnet18", 128), adam.MemoryBank(60, 128, "cpu")
    runs.resume(_args(tmp_path, 2), net, net, bank, lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), saved))
    draws = torch.rand(4, device="cuda")                          # the stream continues where the run left it
    torch.cuda.set_rng_state(saved[torch.cuda.current_device()])
    assert torch.equal(draws, torch.rand(4, device="cuda"))


# ---- the authors' train/val lists (data_prep.py chestxray14 --train-list / --val-list) -----------------------

@pytest.fixture(scope="module")
def cxr14_tree(tmp_path_factory):
    return make_cxr14(tmp_path_factory.mktemp("cxr14") / "src", "flat")


def _lists(tree, tmp_path, train, val):
    """List files in the authors' format: name, then 14 label columns (ignored)."""
    paths = []
    for name, names in (("train.txt", train), ("val.txt", val)):
        (tmp_path / name).write_text("".join(f"{n} 0 1 0 0 0 0 0 0 0 0 0 0 0 0\n" for n in names))
        paths.append(tmp_path / name)
    return paths


def _train_val_by_patient(tree):
    """The fake download's train_val images in CSV, split by patient: patients 5-8 to val, the rest to train."""
    tv = [(n, int(p)) for n, p, _ in tree["recs"] if n not in tree["test"] and n != tree["not_in_csv"]]
    return [n for n, p in tv if not 5 <= p <= 8], [n for n, p in tv if 5 <= p <= 8]


@pytest.mark.slow
def test_train_and_val_lists_make_the_split(cxr14_tree, tmp_path):
    import data_prep
    train, val = _train_val_by_patient(cxr14_tree)
    train_file, val_file = _lists(cxr14_tree, tmp_path, train[1:], val)          # train[0]: in neither list
    out = tmp_path / "cache"
    data_prep.main(["chestxray14", "--src", str(cxr14_tree["root"]), "--out", str(out), "--size", "16",
                    "--skip-bad", "--workers", "1", "--train-list", str(train_file), "--val-list", str(val_file)])
    cache = data_prep.open_cache(out)
    split = {r["name"]: r["split"] for r in cache.index}
    ok = lambda names: [n for n in names if n != cxr14_tree["truncated"]]  # the truncated file is skipped
    assert sorted(n for n, s in split.items() if s == "train") == sorted(ok(train[1:]))
    assert sorted(n for n, s in split.items() if s == "val") == sorted(ok(val))
    assert {n for n, s in split.items() if s == "test"} == cxr14_tree["test"] - {cxr14_tree["truncated"]}
    report = json.loads((out / "report.json").read_text())
    assert report["split_rule"] == "train/val: --train-list / --val-list"
    assert report["split_lists"]["train_list"]["images"] == len(train) - 1
    assert report["split_lists"]["val_list"]["images"] == len(val)
    assert report["split_lists"]["val_list"]["file"] == str(val_file.resolve())
    assert len(report["split_lists"]["train_list"]["sha256"]) == 64
    assert report["train_val_in_neither_list"] == [train[0]]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["missing", "overlap", "shared_patient", "twice", "test_image", "one_list"])
def test_bad_lists_are_refused_naming_file_and_image(cxr14_tree, tmp_path, capsys, fault):
    import data_prep
    train, val = _train_val_by_patient(cxr14_tree)
    named = {"missing": "99999999_000.png", "overlap": val[0], "shared_patient": train[0], "twice": val[0],
             "test_image": sorted(cxr14_tree["test"])[0], "one_list": None}[fault]
    patient_mate = next(n for n in train if n != train[0] and n[:8] == train[0][:8])  # patient with 2+ train images
    bad_val = {"missing": val + [named], "overlap": val, "shared_patient": val + [patient_mate],
               "twice": val + [val[0]], "test_image": val + [named], "one_list": val}[fault]
    bad_train = [n for n in train if n != patient_mate] + ([val[0]] if fault == "overlap" else [])
    train_file, val_file = _lists(cxr14_tree, tmp_path, bad_train, bad_val)
    argv = ["chestxray14", "--src", str(cxr14_tree["root"]), "--out", str(tmp_path / "cache"), "--size", "16",
            "--workers", "1", "--val-list", str(val_file)] + ([] if fault == "one_list" else
                                                              ["--train-list", str(train_file)])
    with pytest.raises(SystemExit):
        data_prep.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert not (tmp_path / "cache").exists()
    if fault == "one_list":
        assert "--train-list and --val-list go together" in err[-1]
        return
    line = err[0]
    assert line.startswith("error: ") and named in line, err
    assert {"missing": f"--val-list {val_file} line {len(val) + 1}: {named} is not an image of the label CSV",
            "overlap": f"--val-list {val_file} line 1: {named} is also in --train-list {train_file}",
            "shared_patient": f"--val-list {val_file} line {len(val) + 1}: {patient_mate}: its patient "
                              f"{int(patient_mate[:8])} also has",
            "twice": f"--val-list {val_file} line {len(val) + 1}: {named} is listed twice",
            "test_image": f"--val-list {val_file} line {len(val) + 1}: {named} is in test_list.txt"}[fault] in line


# ---- segmentation fine-tuning as the authors' benchmark code (finetune.py) ----------------------------------

def test_dice_loss_and_score_pool_the_pixels_of_all_images():
    # two images of two pixels, p = sigmoid(0) = .5 everywhere, targets (1, 1) and (0, 0):
    # pooled 1 - (2 * 1 + 1) / (2 + 2 + 1) = 0.4 (the mean of per-image losses would be (0.25 + 0.5) / 2 = 0.375)
    logits, target = torch.zeros(2, 1, 1, 2), torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    assert float(finetune.dice_loss(logits, target)) == pytest.approx(0.4)
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # 2 * (1 + 0 + 0 + 2) / (4 + 0 + 1 + 5) = 0.6; per image 0.5, 1, 0, 0.8
    assert float(finetune.dice_score(pred, gt, pooled=True)) == pytest.approx(0.6)
    assert float(finetune.dice_score(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool),
                                     pooled=True)) == 1.0


def _augment(S, branch, seed=0):
    """A SegAugment with one branch forced on and the others off."""
    aug = finetune.SegAugment(S)
    for name in ("intensity", "elastic", "crop"):
        setattr(aug, f"p_{name}", 1.0 if name == branch else 0.0)
    torch.manual_seed(seed)
    return aug


def _ramp(S):
    """Image whose grey value is the column / (S - 1), and a mask of the left half."""
    from torchvision import tv_tensors
    x = torch.linspace(0, 1, S).expand(1, S, S).clone()
    return tv_tensors.Image(x), tv_tensors.Mask((x < 0.5).to(torch.uint8))


@pytest.mark.parametrize("S", [64, 224])
def test_seg_augment_elastic_moves_pixels_as_far_as_theirs(S):
    """Their elastic deformation (albumentations 0.4.3: displacement = gaussian_filter(U(-1, 1), sigma=6) * 120 px)
    moves a pixel by 120 / (sqrt(3) 2 sqrt(pi) 6) = 3.26 px (std per axis) at 224 px, scaled with S/224 here.
    Measured from the ramp image: grey value * (S - 1) is where the pixel came from. The mask moves with it."""
    shifts = []
    for seed in range(6):
        x, m = _augment(S, "elastic", seed)(*_ramp(S))
        inner = slice(S // 8, -S // 8)                                  # away from the zero-padded border
        shifts.append((x[0] * (S - 1) - torch.arange(S))[inner, inner].flatten())
        assert ((x[0] < 0.5) == m[0].bool())[inner, inner].float().mean() > 0.97
    want = 120 / (3 ** 0.5 * 2 * math.pi ** 0.5 * 6) * S / 224
    assert float(torch.cat(shifts).std()) == pytest.approx(want, rel=0.2)


def test_seg_augment_crop_zooms_into_a_square_of_156_to_224_px():
    S = 224
    for seed in range(8):
        x, m = _augment(S, "crop", seed)(*_ramp(S))
        assert x.shape == (1, S, S) and m.shape == (1, S, S)
        side = float(x[0, S // 2, -1] - x[0, S // 2, 0]) * (S - 1) + 1          # columns the crop spanned
        assert 156 - 2 <= side <= 224 + 1
        assert torch.equal(x[0, 0], x[0, -1])                             # a square crop, no rotation
        assert ((x[0] < 0.5) == m[0].bool()).float().mean() > 0.98


def test_seg_augment_intensity_is_brightness_contrast_or_gamma():
    S = 32
    for seed in range(20):
        x0, m0 = _ramp(S)
        x, m = _augment(S, "intensity", seed)(x0, m0)
        assert torch.equal(m, m0)
        g, y = x0[0, 0].double(), x[0, 0].double()                   # a row: the ramp before and after
        free = (y > 1e-6) & (y < 1 - 1e-6)                                 # not clipped at 0 or 1
        a, b = torch.linalg.lstsq(torch.stack([g[free], torch.ones_like(g[free])], 1), y[free, None]).solution.flatten()
        linear = torch.allclose((g * a + b).clamp(0, 1), y, atol=1e-5) and abs(a - 1) <= 0.2 + 1e-6 and abs(b) <= 0.2
        inside = free & (g > 1e-2) & (g < 1 - 1e-2)
        gamma = (y[inside].log() / g[inside].log()).median()
        power = torch.allclose(g.pow(gamma), y, atol=1e-4) and 0.8 - 1e-6 <= gamma <= 1.2 + 1e-6
        assert linear or power, seed
    assert (finetune.SegAugment.p_intensity, finetune.SegAugment.p_elastic, finetune.SegAugment.p_crop) == (
        0.3, 0.1, 0.25)


@pytest.mark.slow
def test_segmentation_schedule_patience_and_one_pass_epochs(phantom_root, tmp_path, monkeypatch):
    """Planted validation losses: better at epochs 1-2, then never: with --patience 2 the run stops after epoch 5
    (the third epoch without improvement), tests epoch 2. The lr of epoch e is the authors' cosine set after epoch
    e - 1; --min-iters 0 (the gpu preset's) makes a 3-shot epoch one batch of the 3 images."""
    curve = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    monkeypatch.setattr(finetune, "_val_loss", lambda *a: next(curve))
    lrs, batches = [], []

    class Recording(torch.optim.Adam):
        def step(self, *a, **k):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)
    monkeypatch.setattr(finetune.torch.optim, "Adam", Recording)
    real_loss = finetune.dice_loss
    monkeypatch.setattr(finetune, "dice_loss", lambda p, t: batches.append(len(t)) or real_loss(p, t))
    summary = finetune.main(["--task", "phantom-heart", "--data-root", str(phantom_root), "--arch", "resnet18",
                             "--img-size", "32", "--shots", "3", "--epochs", "10", "--batch-size", "8",
                             "--min-iters", "0", "--patience", "2", "--lr", "0.01", "--device", "cpu",
                             "--save", "none", "--out", str(tmp_path)])
    (r,) = summary["records"]
    assert (r["epochs"], r["best_epoch"], r["patience"], r["min_iters"]) == (5, 2, 2, 0)
    assert batches == [3] * 5
    assert lrs == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * max(e - 2, 0) / 10)) for e in range(1, 6)])
    assert 0 <= r["dice_mean_per_image"] <= 100 and 0 <= r["value"] <= 100


def test_finetune_defaults_follow_the_authors():
    seg = finetune.get_args(["--task", "scr-heart", "--data-root", "x"])
    cls = finetune.get_args(["--task", "chestxray14", "--data-root", "x"])
    assert (seg.patience, seg.min_iters, seg.batch_size, seg.epochs, seg.img_size) == (20, 0, 32, 200, 224)
    assert finetune._config(seg)["lr"] == 1e-3 and finetune._config(cls)["lr"] == 2e-4 and cls.patience == 10
    assert finetune.get_args(["--task", "phantom-heart"]).min_iters == 10
