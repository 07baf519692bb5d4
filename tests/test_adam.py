"""Tests of adam.py: decomposer, loss (against bench.loop_info_nce, brute force), EMA, bank, stages, resume, DDP,
export."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import adam
from adam_cxr import runs
from bench import loop_info_nce  # the brute-force reference: docs/METHOD.md §4 one anchor at a time
from helpers import ROOT, TINY_RUN, loss_inputs, make_cxr14, train_tiny


# ---- Anatomy Decomposer ------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(64, 64), (37, 53), (7, 5), (1000, 999)])
@pytest.mark.parametrize("level", range(6))
def test_parts_tile_the_image_exactly(height, width, level):
    if level == 5 and min(height, width) < 8:
        pytest.skip("image too small for level 5")
    boxes = adam.anatomy_parts(height, width, level)
    assert len(boxes) == 2 ** level
    cover = np.zeros((height, width), int)
    for top, left, h, w in boxes:
        assert h > 0 and w > 0
        cover[top:top + h, left:left + w] += 1
    assert (cover == 1).all(), "parts must cover every pixel exactly once"


@pytest.mark.parametrize("height,width", [(64, 64), (37, 53)])
def test_first_cut_is_vertical_then_alternating(height, width):
    def grid(level):  # (rows, columns) of the part grid
        boxes = adam.anatomy_parts(height, width, level)
        return len({top for top, _, _, _ in boxes}), len({left for _, left, _, _ in boxes})
    assert grid(0) == (1, 1)
    assert grid(1) == (1, 2)  # left | right halves
    assert grid(2) == (2, 2)
    assert grid(3) == (2, 4)  # paper: 2 rows x 4 columns
    assert grid(4) == (4, 4)
    assert grid(5) == (4, 8)
    left, right = adam.anatomy_parts(height, width, 1)
    assert left[2] == right[2] == height and left[3] + right[3] == width


def test_too_small_image_is_refused():
    with pytest.raises(ValueError, match="too small"):
        adam.anatomy_parts(3, 3, 4)


# ---- Views --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels,size,kernel", [(1, 224, 23), (3, 64, 7), (1, 37, 5)])
def test_separable_blur_is_torchvisions_blur(dtype, channels, size, kernel):
    """The two 1-D passes against torchvision's k x k GaussianBlur on fresh random images, the same RNG state
    before each: the same sigma is drawn (the next random number agrees too), float outputs agree to 1e-5
    (summation order), uint8 outputs to one grey level and only where the float result sits on a rounding tie
    (measured: ~3e-5 of the pixels; bound 1e-3)."""
    import torchvision.transforms.v2 as T
    g = torch.Generator().manual_seed(size * kernel)
    for trial in range(4):
        x = torch.randint(0, 256, (channels, size, size), generator=g, dtype=torch.uint8)
        x = x if dtype == torch.uint8 else x.float() / 255
        torch.manual_seed(trial)
        ref, after_ref = T.GaussianBlur(kernel, (0.1, 2.0))(x), torch.rand(1)
        torch.manual_seed(trial)
        out, after_out = adam.SeparableGaussianBlur(kernel, (0.1, 2.0))(x), torch.rand(1)
        assert out.dtype == ref.dtype and out.shape == ref.shape and torch.equal(after_ref, after_out)
        diff = (out.double() - ref.double()).abs()
        if dtype == torch.uint8:
            assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3
        else:
            assert diff.max() < 1e-5


# ---- Purposive Pruner + InfoNCE -----------------------------------------------------------------

@pytest.mark.parametrize("threshold,expect_pruned", [(None, "none"), (1.0, "none"), (0.8, "some"),
                                                     (0.1, "some"), (-1.5, "all")])
def test_info_nce_matches_loop_values_and_gradients(threshold, expect_pruned):
    B, K, D = 5, 37, 16
    q, k, queue = loss_inputs(B, D, K, planted=3, noise=0.05, seed=hash(str(threshold)) % 1000)
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss, pruned = adam.info_nce(q1, k1, queue, 0.2, threshold, return_pruned=True)
    ref = loop_info_nce(q2, k2, queue, 0.2, threshold)
    loss.backward()
    ref.backward()
    # float64 both ways: the vectorised and looped sums differ only by summation order (~1e-15 relative)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q1.grad, q2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(k1.grad, k2.grad, rtol=1e-9, atol=1e-12)
    n_pruned = sum(int((q[i] @ queue.t() >= threshold).sum()) for i in range(B)) if threshold is not None else 0
    assert pruned.item() == pytest.approx(n_pruned / (B * K))
    assert {"none": n_pruned == 0, "some": 0 < n_pruned < B * K, "all": n_pruned == B * K}[expect_pruned]
    if expect_pruned == "all":  # only the positive is left: p_i0 = 1, loss 0
        assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_info_nce_gradient_is_the_closed_form():
    """dL/dq_i = ((p_i0 - 1) k_i + sum_j p_ij b_j) / (tau B), docs/METHOD.md §4 (mean over B anchors)."""
    B, K, D, tau, t = 4, 23, 8, 0.2, 0.3
    q, k, queue = loss_inputs(B, D, K, planted=2, noise=0.05, seed=3)
    q.requires_grad_()
    adam.info_nce(q, k, queue, tau, t).backward()
    s = q.detach() @ queue.t()
    logits = torch.cat([(q.detach() * k).sum(1, keepdim=True), s.masked_fill(s >= t, float("-inf"))], 1) / tau
    p = logits.softmax(1)
    expected = ((p[:, :1] - 1) * k + p[:, 1:] @ queue) / (tau * B)
    torch.testing.assert_close(q.grad, expected, rtol=1e-10, atol=1e-12)


# ---- EMA and bank ------------------------------------------------------------------------------

def test_ema_update():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.clone() for p in teacher.parameters()]
    adam.ema_update(teacher, student, 0.9)
    for xi, xi0, theta in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(xi, 0.9 * xi0 + 0.1 * theta, rtol=0, atol=1e-7)


def test_bank_ring_wraps_with_batch_not_dividing_K():
    bank = adam.MemoryBank(10, 2, "cpu")
    written = []
    for step in range(5):  # 5 batches of 3 = 15 keys into 10 slots
        keys = torch.full((3, 2), float(step * 3)) + torch.arange(3.0).view(3, 1)
        bank.enqueue(keys)
        written += keys[:, 0].tolist()
    assert bank.ptr == 15 % 10
    expected = np.zeros(10)
    for n, v in enumerate(written):  # slot of the n-th key ever written: n mod K
        expected[n % 10] = v
    assert bank.queue[:, 0].tolist() == expected.tolist()


def test_bank_batch_larger_than_K_keeps_newest():
    bank = adam.MemoryBank(4, 1, "cpu")
    bank.enqueue(torch.zeros(1, 1))          # ptr 1
    bank.enqueue(torch.arange(6.0).view(6, 1))  # keys 0..5 go to slots 1,2,3,0,1,2: newest 2..5 survive
    assert bank.ptr == 3
    assert bank.queue[:, 0].tolist() == [3.0, 4.0, 5.0, 2.0]


# ---- training: stages, resume, export, DDP, errors ----------------------------------------------

@pytest.mark.slow
def test_training_loss_goes_down(phantom_root, tmp_path):
    """Two stages (levels 0 then 2). The sampler is seeded, so a run with lr = 0 sees exactly the same views
    and bank-filling dynamics: the only difference is learning. Early epochs are dominated by the random
    bank being replaced by real keys (the loss rises towards log(K+1) = 2.83), so compare the later epochs:
    learning must lower them against not learning, and within stage 1 below the epoch the bank filled.
    The pruner is off here: it removes more of the bank for a less spread-out embedding (the frozen model
    loses ~75% of its negatives at level 2), which lowers the loss without any learning."""
    common = ["--levels", "0,2", "--epochs", "5", "--steps-per-epoch", "4", "--queue-size", "16",
              "--img-size", "48", "--val-steps", "0", "--threshold", "1"]
    learnt = train_tiny(phantom_root, tmp_path / "learnt", *common, "--lr", "1")
    frozen = train_tiny(phantom_root, tmp_path / "frozen", *common, "--lr", "0")
    for a, b in zip(learnt["stages"], frozen["stages"]):
        la, lb = [e["loss"] for e in a["epochs"]], [e["loss"] for e in b["epochs"]]
        assert np.mean(la[-3:]) < np.mean(lb[-3:]), (la, lb)
    stage1 = [e["loss"] for e in learnt["stages"][0]["epochs"]]
    assert np.mean(stage1[-3:]) < stage1[1], stage1


@pytest.mark.slow
def test_stage_two_starts_from_stage_one(phantom_root, tmp_path):
    """Levels 0 then (resumed) 0,2 gives the very losses of one run over 0,2: stage 2 starts from stage 1's
    student, teacher and bank. A stage-2-only run from scratch gives different losses."""
    full = train_tiny(phantom_root, tmp_path / "full")
    train_tiny(phantom_root, tmp_path / "split", "--levels", "0")
    second = adam.main(["--resume", str(tmp_path / "split"), "--levels", "0,2"])
    alone = train_tiny(phantom_root, tmp_path / "alone", "--levels", "2")
    assert [s["level"] for s in full["stages"]] == [0, 2]
    assert second["stages"][0]["level"] == 2
    assert second["stages"][0]["losses"] == full["stages"][1]["losses"]
    assert alone["stages"][0]["losses"] != full["stages"][1]["losses"]
    assert full["stages"][0]["threshold"] is None and full["stages"][1]["threshold"] == 0.8
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=True)
    assert ckpt["level"] == 2 and ckpt["bank"].shape == (60, 128) and ckpt["bank_ptr"] == (6 * 8) % 60


@pytest.mark.slow
def test_resume_mid_stage_gives_the_same_losses(phantom_root, tmp_path, monkeypatch):
    extra = ["--levels", "0,2", "--epochs", "2", "--steps-per-epoch", "2"]
    full = train_tiny(phantom_root, tmp_path / "full", *extra)
    saves = []
    real_save = runs.save_checkpoint

    def save_then_die(path, **state):  # the process "dies" right after the 3rd checkpoint (stage 2, epoch 1)
        real_save(path, **state)
        saves.append(state["epoch"])
        if len(saves) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(phantom_root, tmp_path / "cut", *extra)
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    resumed = adam.main(["--resume", str(tmp_path / "cut")])
    assert resumed["stages"][0]["level"] == 2
    assert resumed["stages"][0]["losses"] == full["stages"][1]["losses"][2:]
    log = [json.loads(line) for line in open(tmp_path / "cut" / "log.jsonl")]
    assert [(r["level"], r["epoch"]) for r in log] == [(0, 1), (0, 2), (2, 1), (2, 2)]
    assert all(np.isfinite(r["loss"]) and 0 <= r["pruned"] <= 1 and r["images_per_s"] > 0 for r in log)


@pytest.mark.slow
def test_exported_backbone_loads_into_torchvision(tiny_adam_run):
    for level in (0, 2):
        state = torch.load(tiny_adam_run / f"adam_resnet18_level{level}.pth", weights_only=True)
        missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
        assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    ckpt = torch.load(tiny_adam_run / "checkpoint.pth", weights_only=True)
    last = torch.load(tiny_adam_run / "adam_resnet18_level2.pth", weights_only=True)
    for key, value in last.items():
        assert torch.equal(ckpt["student"]["backbone." + key], value)


@pytest.mark.slow
def test_two_process_gloo_torchrun(phantom_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           str(ROOT / "adam.py"), *TINY_RUN, "--data-root", str(phantom_root), "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["bank_ptr"] == (6 * 8) % 60  # both ranks' keys were enqueued
    assert (tmp_path / "adam_resnet18_level2.pth").exists()
    assert done.stdout.count("== stage 1/2") == 1  # only rank 0 prints


@pytest.mark.slow
def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_prep.py chestxray14"):
        adam.main(["--data", "chestxray14", "--data-root", str(tmp_path / "nowhere")])
    done = subprocess.run([sys.executable, str(ROOT / "adam.py"), "--data", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "adam.py: error:" in done.stderr and "Traceback" not in done.stderr
    assert str(tmp_path / "nowhere") in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_names_the_file(tmp_path, workers):
    from PIL import Image
    for i in range(9):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    bad = tmp_path / "4.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    argv = ["--data", str(tmp_path), "--arch", "resnet18", "--img-size", "32", "--batch-size", "3",
            "--queue-size", "12", "--levels", "0", "--epochs", "1", "--workers", str(workers),
            "--device", "cpu", "--out", str(tmp_path / "run")]
    with pytest.raises(adam.DataError, match="4.png"):
        adam.main(argv)


@pytest.mark.slow
def test_trains_on_a_prepared_chestxray14_cache(tmp_path):
    """data_prep.py's cache of a fake ChestX-ray14 download (both made by test_data_prep's fixture code) is what
    `--data chestxray14 --data-root` reads: a few steps on it, with the paper preset's flags shrunk."""
    import data_prep
    make_cxr14(tmp_path / "src", "flat")
    data_prep.main(["chestxray14", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "cxr14"),
                    "--size", "32", "--skip-bad", "--workers", "1"])
    s = adam.main(["--data", "chestxray14", "--data-root", str(tmp_path / "cxr14"), "--arch", "resnet18",
                   "--img-size", "32", "--batch-size", "3", "--queue-size", "16", "--levels", "0,4",
                   "--epochs", "1", "--steps-per-epoch", "2", "--workers", "0", "--device", "cpu",
                   "--out", str(tmp_path / "run")])
    assert [len(st["losses"]) for st in s["stages"]] == [2, 2]
    assert all(np.isfinite(st["losses"]).all() for st in s["stages"])
    assert s["stages"][1]["epochs"][0]["val_loss"] is not None  # the cache's val split is used


@pytest.mark.slow
def test_device_views_path_trains_and_needs_a_cache(phantom_root, tmp_path, capsys):
    """--views device (BatchViews, tested against torchvision in test_gpu_views.py) runs the same training loop,
    here on the CPU, with workers returning (part, parameters of both views); a plain folder is refused by name.
    --gpu-views is the deprecated alias; auto picks the CPU workers on a CPU."""
    s = train_tiny(phantom_root, tmp_path / "run", "--views", "device", "--workers", "1")
    assert [len(st["losses"]) for st in s["stages"]] == [3, 3]
    assert all(np.isfinite(st["losses"]).all() for st in s["stages"])
    assert "views on cpu (BatchViews)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--views device needs a data_prep.py cache"):
        adam.main(["--data", str(phantom_root / "png"), "--views", "device", "--batch-size", "4",
                   "--out", str(tmp_path / "x")])
    assert adam.parse_args(["--gpu-views"]).views == "device" and adam.parse_args([]).views == "auto"
    images, _, views = adam.open_data(adam.parse_args(TINY_RUN + ["--data-root", str(phantom_root)]), 1,
                                      torch.device("cpu"))
    assert views is None  # auto on a CPU: the workers make the views


def _cache_images(array):
    """A data_prep.CacheImages over an in-memory N x H x W uint8 array (all rows in the split)."""
    import data_prep
    images = data_prep.CacheImages.__new__(data_prep.CacheImages)
    images.images, images.rows, images.name = array, list(range(len(array))), "array"
    return images


@pytest.mark.parametrize("height,width,level", [(64, 64, 2), (37, 53, 3)])
def test_device_views_samples_are_the_part_and_its_views_parameters(height, width, level):
    """What a worker ships for device views: the AD's part read from the cache (padded by repeating its last row
    and column to the level's largest part, so a batch stacks) and both views' parameters, the same as
    BatchViews.draw gives for the part's box in the whole image, shifted by the part's corner."""
    from adam_cxr.gpu_views import BatchViews
    array = np.random.default_rng(0).integers(0, 256, (3, height, width), dtype=np.uint8)
    bv = BatchViews(24)
    dataset = adam.AdamViews(_cache_images(array), level, 24, bv)
    parts = adam.anatomy_parts(height, width, level)
    ph, pw = max(b[2] for b in parts), max(b[3] for b in parts)
    for index, seed in [(0, 5), (2, 123), (1, 2**40)]:
        part, params = dataset[(index, seed)]
        g = torch.Generator().manual_seed(seed)  # the sample's draws, as AdamViews makes them
        top, left, h, w = parts[torch.randint(len(parts), (), generator=g).item()]
        view_seed = torch.randint(2**62, (1,), generator=g)
        assert part.shape == (1, ph, pw) and part.dtype == torch.uint8
        rows, cols = np.minimum(np.arange(ph), h - 1), np.minimum(np.arange(pw), w - 1)
        assert np.array_equal(part[0].numpy(), array[index, top:top + h, left:left + w][np.ix_(rows, cols)])
        full = bv.draw(torch.tensor([[top, left, h, w]]), view_seed)[0]                  # 2 x 14
        assert params.shape == (2, 14)
        assert torch.equal(params[:, :4] + torch.tensor([top, left, 0, 0]), full[:, :4])  # CROP, in the part
        assert torch.equal(params[:, 4:], full[:, 4:])


def test_cpu_views_ship_uint8_and_are_normalised_on_the_device(phantom_root):
    """The workers' views are uint8 (a twelfth of the normalised floats); to_views scales and normalises the
    batch: the same numbers as normalising each view on its own (one float32 rounding)."""
    import data_prep
    images = data_prep.open_images("phantom", str(phantom_root), "train")
    x_q, x_k = adam.AdamViews(images, 2, 32)[(3, 77)]
    assert x_q.dtype == x_k.dtype == torch.uint8 and x_q.shape == (1, 32, 32)
    n_q, n_k = adam.to_views((x_q[None], x_k[None]), None, torch.channels_last)
    assert n_q.shape == (1, 3, 32, 32) and n_q.is_contiguous(memory_format=torch.channels_last)
    ref = adam.imagenet_normalise(torchvision.transforms.v2.functional.to_dtype(x_k, torch.float32, scale=True))
    assert (n_k[0] - ref).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_device_batches_copy_ahead_on_cuda():
    """device_batches hands out each batch on the GPU, in order; with device views the views' parameters (the
    second tensor) stay on the host, without them every tensor moves."""
    from adam_cxr.gpu_views import BatchViews
    items = [(torch.full((2, 3), float(i)).pin_memory(), torch.full((2, 14), float(i)).pin_memory()) for i in range(4)]
    for views in (None, BatchViews(32)):
        out = list(adam.device_batches(items, torch.device("cuda"), views))
        assert [(float(x[0, 0]), float(p[0, 0])) for x, p in out] == [(i, i) for i in (0.0, 1.0, 2.0, 3.0)]
        assert all(x.is_cuda and p.is_cuda == (views is None) for x, p in out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_the_training_step_makes_no_host_sync(phantom_root):
    """Device views, normalisation and train_step queue work on the GPU without the host waiting for it
    (torch.cuda.set_sync_debug_mode("error") raises at a synchronising call)."""
    args = adam.parse_args(TINY_RUN + ["--data-root", str(phantom_root), "--device", "cuda", "--views", "device"])
    device, _, _ = adam.setup_devices(args)
    images, _, views = adam.open_data(args, 1, device)
    student, teacher, bank, model, teacher_fwd, groups, layout = adam.build_models(args, device, 1, 8)
    optimizer = adam.make_optimizer(student, 0.03, args)
    loader, _ = adam.make_loader(images, 2, args, 24, 1, 0, 0, 8, views)
    batches = adam.device_batches(loader, device, views)
    adam.train_step(*adam.to_views(next(batches), views, layout), model, teacher_fwd, bank, optimizer, args, 0.8,
                    False, groups)  # warm-up: first allocations, cuDNN's choices
    torch.cuda.synchronize()
    item = next(batches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, pruned = adam.train_step(*adam.to_views(item, views, layout), model, teacher_fwd, bank, optimizer,
                                       args, 0.8, False, groups)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_shuffle_bn_groups_follow_the_preset_unless_given():
    demo, paper = adam.parse_args([]), adam.parse_args(["--data", "chestxray14"])
    assert [adam.bn_groups(demo, b) for b in (4, 8, 16, 32, 64)] == [1, 1, 2, 4, 8]       # a group per 8 images
    assert [adam.bn_groups(paper, b) for b in (32, 64, 256)] == [1, 1, 4]                 # a group per 64 images
    assert adam.bn_groups(adam.parse_args(["--bn-groups", "2"]), 32) == 2
    assert (demo.temperature, paper.temperature) == (0.1, 0.2)                             # tau, from each preset
    assert adam.parse_args(["--temperature", "0.3"]).temperature == 0.3
