"""finetune.py: checkpoint loading in every form, few-shot draws, metrics and statistics against hand-computed
values, and short end-to-end runs on the tiny phantom from a real (tiny) adam.py pretraining."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
import torchvision

import data_prep
import finetune
from adam_cxr import runs

ARCH = "resnet18"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny workloads run on one thread


@pytest.fixture(scope="module")
def reference():
    """A resnet18 state dict with non-default weights and BatchNorm buffers (so a silent fallback to a fresh
    initialisation cannot pass the equality checks)."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.num_batches_tracked.fill_(7)
    return m.state_dict()


def _bump(sd):
    """Same keys, different values: stands for MoCo's encoder_k, Adam's teacher, an earlier level."""
    return {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}


def _assert_backbone_equal(model, reference):
    got = model.state_dict()
    want = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"differs: {bad[:5]}"


@pytest.mark.slow
def test_each_checkpoint_form_gives_identical_backbone(tmp_path, reference):
    bb = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    mlp = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.randn(512),
           "fc.2.weight": torch.randn(128, 512), "fc.2.bias": torch.randn(128)}
    files = {
        # MoCo v1 release layout: DataParallel prefix, linear fc head, key encoder and queue beside it
        "moco_v1.pth.tar": {"epoch": 200, "arch": ARCH, "state_dict": {
            **{f"module.encoder_q.{k}": v for k, v in reference.items()},
            **{f"module.encoder_k.{k}": v for k, v in _bump(reference).items()},
            "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
        # MoCo v2 without DataParallel, MLP head fc.0 / fc.2
        "moco_v2.pth": {"state_dict": {**{f"encoder_q.{k}": v for k, v in bb.items()},
                                       **{f"encoder_q.{k}": v for k, v in mlp.items()}}},
        # adam.py checkpoint.pth: student = backbone.* + head.*, teacher different
        "checkpoint.pth": {"arch": ARCH, "level": 2, "student": {**{f"backbone.{k}": v for k, v in bb.items()},
                                                                 "head.0.weight": torch.randn(8, 512)},
                           "teacher": {f"backbone.{k}": v for k, v in _bump(bb).items()},
                           "bank": torch.randn(16, 8), "bank_ptr": 3},
        "adam_resnet18_level2.pth": bb,        # exported backbone
        "adam_resnet18_level0.pth": _bump(bb),  # an earlier level in the same run folder: must not be taken
        "resnet18_tv.pth": reference,          # torchvision state dict with its fc
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    specs = ["moco:" + str(tmp_path / "moco_v1.pth.tar"), "moco:" + str(tmp_path / "moco_v2.pth"),
             "adam:" + str(tmp_path / "checkpoint.pth"), "adam:" + str(tmp_path / "adam_resnet18_level2.pth"),
             "adam:" + str(tmp_path), "torchvision:" + str(tmp_path / "resnet18_tv.pth")]
    for spec in specs:
        m = finetune.load_backbone(spec, ARCH)
        assert isinstance(m.fc, torch.nn.Identity), spec
        _assert_backbone_equal(m, reference)
    # the U-Net's encoder receives exactly these weights
    unet = finetune.build_model("phantom-heart", specs[0], ARCH, 0)
    _assert_backbone_equal(unet.encoder, reference)


@pytest.mark.slow
def test_real_adam_run_forms_agree(tiny_adam_run):
    """adam.py's own outputs: checkpoint.pth (last stage), the last exported level and the run folder agree."""
    run = tiny_adam_run
    a = finetune.load_backbone(f"adam:{run / 'checkpoint.pth'}", ARCH).state_dict()
    for spec in (f"adam:{run / 'adam_resnet18_level2.pth'}", f"adam:{run}"):
        b = finetune.load_backbone(spec, ARCH).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), spec
    level0 = finetune.load_backbone(f"adam:{run / 'adam_resnet18_level0.pth'}", ARCH).state_dict()
    assert not torch.equal(level0["conv1.weight"], a["conv1.weight"])  # the level-2 stage did train


@pytest.mark.slow
def test_every_script_accepts_the_same_archs(tmp_path):
    """adam.ARCHS is the one list: adam.py, finetune.py and eve.py accept each entry, the wide ResNets
    included (for segmentation too: a U-Net on a wide ResNet-50 encoder runs), and refuse anything else."""
    import adam
    import eve
    for arch in adam.ARCHS:
        assert adam.parse_args(["--arch", arch]).arch == arch
        assert finetune.get_args(["--task", "phantom-heart", "--arch", arch]).arch == arch
        assert eve.get_args(["--arch", arch]).arch == arch
    for parse in (adam.parse_args, eve.get_args, lambda a: finetune.get_args(["--task", "phantom-heart", *a])):
        with pytest.raises(SystemExit):
            parse(["--arch", "resnext50_32x4d"])
    torch.manual_seed(0)
    backbone = torchvision.models.wide_resnet50_2()
    torch.save(backbone.state_dict(), tmp_path / "wide.pth")
    unet = finetune.build_model("phantom-heart", f"torchvision:{tmp_path / 'wide.pth'}", "wide_resnet50_2", 1,
                                decoder_channels=(16, 16, 16, 16, 16)).eval()
    assert torch.equal(unet.encoder.layer4[2].conv2.weight, backbone.layer4[2].conv2.weight)
    with torch.no_grad():
        assert unet(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_incomplete_or_wrong_checkpoints_are_refused(tmp_path, reference):
    bb = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    missing = dict(bb)
    del missing["layer3.1.bn2.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*1 missing: layer3\.1\.bn2\.running_var"):
        finetune.load_backbone(f"adam:{tmp_path / 'missing.pth'}", ARCH)
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in bb.items()}}, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"r18\.pth.*mis-shaped.*--arch"):
        finetune.load_backbone(f"moco:{tmp_path / 'r18.pth'}", "resnet50")
    torch.save({"arch": "resnet50", "student": {}}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="pass --arch resnet50"):
        finetune.load_backbone(f"adam:{tmp_path / 'checkpoint.pth'}", ARCH)
    torch.save({"args": argparse.Namespace(lr=1), "state_dict": bb}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match=r"pickle\.pth.*weights_only=True"):
        finetune.load_backbone(f"moco:{tmp_path / 'pickle.pth'}", ARCH)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        finetune.load_backbone(f"torchvision:{tmp_path / 'nope.pth'}", ARCH)
    with pytest.raises(ValueError, match="bad --init"):
        finetune.load_backbone("simclr:x.pth", ARCH)
    with pytest.raises(ValueError, match="bad --init"):
        finetune.load_backbone("timm", ARCH)                     # a file form without its file


def test_few_shot_draws_reproducible_and_disjoint(phantom_root):
    cache = data_prep.open_cache(phantom_root)
    train, held = cache.rows("train"), set(cache.rows("val")) | set(cache.rows("test"))
    assert train and held
    for shots in (3, 6, 12):
        a = finetune.draw_shots(train, shots, seed=3)
        assert a == finetune.draw_shots(list(reversed(train)), shots, seed=3)  # order of rows does not matter
        assert len(set(a)) == shots and set(a) <= set(train) and not set(a) & held
        name = {r["i"]: r["name"] for r in cache.index}
        assert not {name[i] for i in a} & {name[i] for i in held}
    draws = {tuple(finetune.draw_shots(train, 6, seed=s)) for s in range(5)}
    assert len(draws) > 1  # different seeds give different draws
    with pytest.raises(ValueError, match="--shots"):
        finetune.draw_shots(train, len(train) + 1, seed=0)


def test_auc_matches_hand_computed():
    y = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]])
    s = np.array([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.5, 0.2], [0.35, 0.7, 0.1, 0.1], [0.8, 0.6, 0.9, 0.4]])
    per, mean, undefined = finetune.roc_auc(y, s)
    # class 0: positives .35, .8 vs negatives .1, .4 -> 3 of 4 pairs ordered = 0.75
    # class 1: positives .9, .7 vs negatives .2, .6 -> 4 of 4 = 1.0
    # class 2: positives .5, .9 vs negatives .5, .1 -> 1 tie (counts 1/2) + 3 ordered = 0.875
    # class 3: no positive -> undefined (None, with its reason), left out of the mean
    assert per[:3] == pytest.approx([0.75, 1.0, 0.875]) and per[3] is None
    assert undefined == {3: "no positive image in the test split"}
    assert mean == pytest.approx((0.75 + 1.0 + 0.875) / 3)
    y[:, 3] = 1                                                     # all positive: undefined too
    assert finetune.roc_auc(y, s)[2] == {3: "no negative image in the test split"}
    assert finetune.roc_auc(y[:, 3:], s[:, 3:])[:2] == ([None], None)  # nothing defined: no mean


def test_dice_matches_hand_computed():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    gt = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    # 2*1/(2+2), both empty, prediction on an empty mask, 2*2/(3+2)
    assert finetune.dice_score(pred, gt).tolist() == pytest.approx([0.5, 1.0, 0.0, 0.8])
    # soft Dice with eps = 1: p = sigmoid(0) = .5 on both pixels, target (1, 0):
    # 1 - (2 * .5 + 1) / (.5 + .5 + 1 + 1) = 1/3
    logits = torch.zeros(1, 1, 1, 2)
    assert float(finetune.dice_loss(logits, torch.tensor([[[[1.0, 0.0]]]]))) == pytest.approx(1 / 3)


def test_summary_and_paired_test_match_hand_computed():
    s = finetune.summarize([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, df=2} from tables, std = 1
    assert (s["n"], s["mean"], s["std"]) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert (s["ci_lo"], s["ci_hi"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    # differences 1, 2, 3: t = 2 / (1 / sqrt 3); with df = 2 the two-sided p has the closed form 1 - t/sqrt(2+t^2)
    t = 2 * math.sqrt(3)
    p = finetune.paired_test([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert p["mean_diff"] == pytest.approx(2.0) and p["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert math.isnan(finetune.summarize([5.0])["std"])


@pytest.mark.slow
def test_three_shot_phantom_heart_from_adam_run(tiny_adam_run, phantom_root, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    argv = ["--task", "phantom-heart", "--data-root", str(phantom_root), "--init", f"adam=adam:{tiny_adam_run}",
            "--init", "random", "--arch", ARCH, "--img-size", "32", "--shots", "3", "--runs", "2",
            "--epochs", "2", "--batch-size", "3", "--min-iters", "1", "--device", "cpu", "--workers", "0",
            "--out", str(out)]
    summary = finetune.main(argv)
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 4 and summary["records"] == records
    cache = data_prep.open_cache(phantom_root)
    held = set(cache.rows("val")) | set(cache.rows("test"))
    for r in records:
        assert r["task"] == "phantom-heart" and r["shots"] == 3 and r["metric"] == "dice"
        assert 0 <= r["value"] <= 100 and 1 <= r["best_epoch"] <= r["epochs"] <= 2 and r["time_s"] > 0
        assert r["train_rows"] == finetune.draw_shots(cache.rows("train"), 3, r["seed"])
        assert not set(r["train_rows"]) & held
        best = out / "checkpoints" / f"{r['init']}_phantom-heart_3shot_seed{r['seed']}.pth"
        ckpt = torch.load(best, weights_only=True)
        assert ckpt["record"]["seed"] == r["seed"]
    assert sorted((r["init"], r["seed"]) for r in records) == [("adam", 0), ("adam", 1), ("random", 0), ("random", 1)]
    table = (out / "results.md").read_text()
    assert "| Method | 3-shot |" in table and "| adam |" in table and "paired t-test" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resume: everything is already in results.json, nothing trains again
    monkeypatch.setattr(finetune, "run_one", lambda *a, **k: pytest.fail("should have been skipped"))
    finetune.main(argv)
    assert json.loads((out / "results.json").read_text()) == records


@pytest.mark.slow
def test_linear_probe_on_phantom_findings(phantom_root, tmp_path, reference):
    torch.save(reference, tmp_path / "tv.pth")
    out = tmp_path / "ft"
    summary = finetune.main(["--task", "phantom-findings", "--data-root", str(phantom_root), "--init",
                             f"torchvision:{tmp_path / 'tv.pth'}", "--freeze", "--arch", ARCH, "--img-size", "32",
                             "--epochs", "1", "--batch-size", "8", "--min-iters", "1", "--device", "cpu",
                             "--out", str(out)])
    (r,) = summary["records"]
    assert r["metric"] == "auc" and list(r["per_class"]) == data_prep.PHANTOM_LABELS
    defined = [a for a in r["per_class"].values() if a is not None]
    assert r["value"] == pytest.approx(100 * np.mean(defined))
    # The tiny phantom's test split holds no cardiomegaly: its AUC is undefined, said with the reason in the record
    # (null in strict JSON, never NaN), in the table and at start, and left out of the mean, not averaged as NaN.
    test_labels = {label for i in data_prep.open_cache(phantom_root).rows("test")
                   for label in data_prep.open_cache(phantom_root).index[i]["labels"]}
    assert "cardiomegaly" not in test_labels and {"nodule", "effusion"} <= test_labels
    assert r["auc_undefined"] == {"cardiomegaly": "no positive image in the test split"}
    assert r["per_class"]["cardiomegaly"] is None and len(defined) == 2
    saved = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert saved[0]["per_class"]["cardiomegaly"] is None and saved[0]["data"] == runs.data_identity(phantom_root)
    assert "AUC undefined, so left out of the mean: cardiomegaly (no positive image in the test split)" in \
        (out / "results.md").read_text()
    # --freeze: the encoder (BatchNorm statistics included) leaves training untouched
    (path,) = (out / "checkpoints").glob("*_phantom-findings_allshot_seed0.pth")
    state = torch.load(path, weights_only=True)["model"]
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    _assert_backbone_equal(model, reference)


def test_missing_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_prep.py"):
        finetune.main(["--task", "scr-heart", "--data-root", str(tmp_path / "jsrt"), "--out", str(tmp_path / "o")])
