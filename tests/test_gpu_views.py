"""gpu_views.BatchViews (adam.py --views device) against its readable reference, torchvision's per-sample
transforms as AdamViews uses them: each step with forced parameters, then the random parameters' statistics,
determinism and the output contract (views in [0, 1]; adam.imagenet_normalise follows in adam.to_views)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import adam
from adam_cxr import gpu_views

def smooth_image(h, w, seed=0, channels=1):
    """Random low-frequency image in [0, 1]: bilinear interpolation is exact on it up to second-order terms."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, 6, 6, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp(0, 1)


def params(crop, angle=0.0, jitter=(1.0, 1.0, 1.0, 0.0), order=(0, 1, 2, 3), sigma=0.0):
    """One sample's row of BatchViews.draw (1 x 14)."""
    return torch.tensor([[*crop, angle, *jitter, *order, sigma]], dtype=torch.float64)


def test_crop_matches_resized_crop():
    # A 40 x 48 crop of a 64 px part of a 160 px image, upsampled to 96 px: torchvision's bilinear resize
    # (antialias does nothing when enlarging) and grid_sample use the same half-pixel rule, so the interior
    # agrees to float rounding (1e-5). The outer 3 px differ by design: torchvision clamps at the crop's edge,
    # BatchViews reads the real neighbours beyond it.
    img = smooth_image(160, 160)
    top, left, i, j, h, w = 30, 50, 9, 5, 40, 48
    part = img[..., top:top + 64, left:left + 64]
    ref = v2.functional.resized_crop(part, i, j, h, w, [96, 96], antialias=True)
    out = (gpu_views.BatchViews(96).views_with(img, params((top + i, left + j, h, w))))
    assert (out - ref)[..., 3:-3, 3:-3].abs().max() < 1e-5
    assert (out - ref).abs().max() < 0.05  # the border: a half source pixel of a smooth image


def test_shrinking_reads_a_mip_level():
    # Shrinking a 1-px checkerboard 3.75x: torchvision's antialiased resize gives flat grey 0.5; so does the mip
    # level (2x2 means of a checkerboard are 0.5), while plain bilinear aliases into a
    # +-0.28 pattern (bound 0.2). torchvision is off by 0.0033 at the edge, where its filter is truncated: 5e-3.
    img = ((torch.arange(128).view(-1, 1) + torch.arange(128)) % 2).float().view(1, 1, 128, 128)
    ref = v2.functional.resized_crop(img, 0, 0, 120, 120, [32, 32], antialias=True)
    out = (gpu_views.BatchViews(32).views_with(img, params((0, 0, 120, 120))))
    plain = F.interpolate(img[..., :120, :120], size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    assert (ref - 0.5).abs().max() < 5e-3 and (out - 0.5).abs().max() < 1e-5 and (plain - 0.5).abs().max() > 0.2


def test_rotation_matches_rotate():
    # Whole image as the crop: one bilinear rotation on each side with zero fill; same grid, so 1e-5 everywhere.
    img = smooth_image(64, 64, seed=1)
    for angle in (-30.0, 12.5, 30.0):
        ref = v2.functional.rotate(img, angle, interpolation=v2.InterpolationMode.BILINEAR)
        out = (gpu_views.BatchViews(64).views_with(img, params((0, 0, 64, 64), angle=angle)))
        assert (out - ref).abs().max() < 1e-5, angle


def test_crop_then_rotation_is_one_interpolation():
    # rotate(resized_crop(part)) (the reference: two interpolations) vs the single composed map, where the
    # rotated crop covers the view at least 3 px deep. On a linear ramp bilinear interpolation is exact, so
    # both are exact and must agree to float rounding (1e-5): this checks the composed geometry. On a smooth
    # image the reference's second interpolation (of a piecewise-linear image) adds its own error, measured
    # 1.6e-3 here: bound 3e-3. Where the rotated crop is absent, the view is exactly 0 (torchvision's fill).
    yy, xx = torch.meshgrid(torch.arange(160.0), torch.arange(160.0), indexing="ij")
    ramp = (0.2 + 0.003 * xx + 0.002 * yy).view(1, 1, 160, 160)
    top, left, h, w = 40, 30, 48, 40
    cover = v2.functional.rotate(torch.ones(1, 1, 96, 96), 25.0, interpolation=v2.InterpolationMode.BILINEAR)
    inside = -F.max_pool2d(-cover, 7, stride=1, padding=3) > 0.999
    assert inside.float().mean() > 0.4
    for img, tol in ((ramp, 1e-5), (smooth_image(160, 160, seed=2), 3e-3)):
        ref = v2.functional.rotate(v2.functional.resized_crop(img, top, left, h, w, [96, 96], antialias=True),
                                   25.0, interpolation=v2.InterpolationMode.BILINEAR)
        out = (gpu_views.BatchViews(96).views_with(img, params((top, left, h, w), angle=25.0)))
        assert (out - ref)[inside].abs().max() < tol
        assert out[cover == 0].abs().max() == 0


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_matches_torchvision(channels):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, channels, 20, 24, generator=g)
    factors = torch.stack([0.6 + 0.8 * torch.rand(6, generator=g), 0.6 + 0.8 * torch.rand(6, generator=g),
                           0.6 + 0.8 * torch.rand(6, generator=g), -0.1 + 0.2 * torch.rand(6, generator=g)], 1)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(6)])
    out = gpu_views.BatchViews.jitter(x, factors, order)
    ops = [v2.functional.adjust_brightness, v2.functional.adjust_contrast, v2.functional.adjust_saturation,
           v2.functional.adjust_hue]
    for n in range(6):
        ref = x[n]
        for op in order[n].tolist():
            ref = ops[op](ref, factors[n, op].item())
        # brightness / contrast / saturation: the same float ops (1e-6); hue: an HSV round trip written
        # differently from torchvision's (1e-5, a few float32 ulps of the [0, 1] range)
        assert (out[n] - ref).abs().max() < (1e-6 if channels == 1 else 1e-5), (n, order[n])


def test_blur_matches_gaussian_blur():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(4, 3, 40, 40, generator=g)
    sigma = torch.tensor([0.3, 0.0, 1.1, 2.0])  # 0 = not blurred
    bv = gpu_views.BatchViews(224)                      # kernel 23 (radius 11), as at 224 px
    out = bv.blur(x, sigma)
    for n in range(4):
        if sigma[n] == 0:
            assert torch.equal(out[n], x[n])
        else:
            ref = v2.functional.gaussian_blur(x[n], [23, 23], [sigma[n].item()] * 2)
            assert (out[n] - ref).abs().max() < 1e-5  # separable vs 2-D kernel: float rounding only


def test_parameter_statistics():
    # 2000 samples x 2 views = 4000 draws. Binomial bounds at 5 sigma: jitter p = 0.8, sd = sqrt(.8 * .2 / 4000)
    # = 0.0063 -> |f - 0.8| < 0.032; blur p = 0.5, sd = 0.0079 -> |f - 0.5| < 0.04.
    n, bv = 2000, gpu_views.BatchViews(112)
    boxes = torch.tensor([[16, 8, 240, 200]] * n)
    rows = bv.draw(boxes, torch.arange(n) * 7919).flatten(0, 1)                     # 2n x 14
    p = {"crop": rows[:, gpu_views.CROP], "angle": rows[:, gpu_views.ANGLE], "jitter": rows[:, gpu_views.JITTER],
         "order": rows[:, gpu_views.ORDER].long(), "sigma": rows[:, gpu_views.SIGMA]}
    jittered = (p["jitter"] != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1).float().mean()
    blurred = (p["sigma"] > 0).float().mean()
    assert abs(jittered - 0.8) < 0.032 and abs(blurred - 0.5) < 0.04
    s = p["sigma"][p["sigma"] > 0]
    assert s.min() >= 0.05 and s.max() <= 1.0  # U(0.1, 2.0) * 112 / 224
    assert p["angle"].abs().max() <= 30 and p["angle"].min() < -25 and p["angle"].max() > 25
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # permutations
    top, left, h, w = p["crop"].unbind(1)
    assert (top >= 16).all() and (left >= 8).all() and (top + h <= 16 + 240).all() and (left + w <= 8 + 200).all()
    area = h * w / (240 * 200)
    # scale in [0.2, 1] of the part, up to rounding the sides to integers (-1% at 0.2 of a 240 x 200 part)
    assert area.min() >= 0.19 and area.max() <= 1
    # the same distribution as torchvision's RandomResizedCrop: mean scale within 5 standard errors
    ref = torch.tensor([(lambda b: b[2] * b[3])(v2.RandomResizedCrop.get_params(
        torch.empty(1, 240, 200), [0.2, 1.0], [3 / 4, 4 / 3])) for _ in range(4000)]) / (240 * 200)
    se = math.sqrt(area.var() / 4000 + ref.var() / 4000)
    assert abs(area.mean() - ref.mean()) < 5 * se


def test_crop_fallback():
    # A 10 x 200 part: every try needs h >= sqrt(0.2 * 2000 * 3/4) = 17 > 10, so torchvision's fallback:
    # height kept, width 10 * 4/3 -> 13, centred.
    assert gpu_views.random_crop_box(10, 200, [0.5] * 22) == (0, 93, 10, 13)
    assert gpu_views.random_crop_box(200, 10, [0.5] * 22) == (93, 0, 13, 10)


def test_deterministic_and_device_independent():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (6, 1, 96, 96), dtype=torch.uint8, generator=g)
    boxes = torch.tensor(adam.anatomy_parts(96, 96, 2) + adam.anatomy_parts(96, 96, 1))
    seeds = torch.randint(2**62, (6,), generator=g)
    bv = gpu_views.BatchViews(48)
    q1, k1 = bv(x, boxes, seeds)
    q2, k2 = bv(x, boxes, seeds)
    assert torch.equal(q1, q2) and torch.equal(k1, k2)
    q3, _ = bv(x, boxes, seeds + 1)
    assert (q1 - q3).abs().amax((1, 2, 3)).min() > 0.1  # other seeds, other views
    assert (q1 - k1).abs().amax((1, 2, 3)).min() > 0.1  # the two views differ
    if torch.cuda.is_available():  # parameters come from the CPU; pixels equal up to rounding, where cuDNN
        # may run the blur's convolution in TF32 (10-bit mantissa, ~1e-3 of [0, 1]): 2.5e-3
        qc, kc = bv(x.cuda(), boxes, seeds)
        assert (qc.cpu() - q1).abs().max() < 2.5e-3 and (kc.cpu() - k1).abs().max() < 2.5e-3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_output_on_cuda():
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, device="cuda")
    q, k = gpu_views.BatchViews(32)(x, torch.tensor([[0, 0, 64, 64]] * 2), torch.tensor([1, 2]))
    assert q.device.type == "cuda" and k.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_range(channels):
    x = torch.randint(0, 256, (5, channels, 80, 64), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 80, 64], [0, 0, 40, 32], [40, 32, 40, 32], [0, 32, 80, 32], [7, 3, 9, 5]])
    q, k = gpu_views.BatchViews(40)(x, boxes, torch.arange(5))
    for y in (q, k):
        assert y.shape == (5, channels, 40, 40) and y.dtype == torch.float32
        assert (y >= 0).all() and (y <= 1).all() and y.amax() > 0.5
    with pytest.raises(ValueError, match="uint8"):
        gpu_views.BatchViews(40)(x.float(), boxes, torch.arange(5))
    with pytest.raises(ValueError, match="boxes"):
        gpu_views.BatchViews(40)(x, boxes[:3], torch.arange(5))


def test_same_pixel_statistics_as_adamviews():
    # End to end against the per-sample reference: 128 samples (16 images, level-2 parts), each made by both
    # pipelines from the same image and part (AdamViews draws the part first from the sample's seed:
    # reproduced here). Per view: the mean and the std of its pixels.
    # - paired by sample (removes the images' own variance): the mean difference is within 5 standard errors;
    # - the spread between a sample's two views (mostly jitter, crop, rotation): var(m_q - m_k) of both
    #   pipelines within a factor 2 (each variance from 128 samples has relative SE sqrt(2/127) = 0.125, so
    #   log 2 is ~4 SE of the log-ratio). Removing the jitter or the rotation fails it (checked by hand when
    #   writing this test); shifts below ~0.05 of the mean (in [0, 1]), or dropping the blur on these
    #   smooth images, pass: the per-step tests above are the precise ones, this one guards the assembly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-sample ops on 48 px images: extra threads only contend (3x slower on 2 cores)
    try:
        same_pixel_statistics()
    finally:
        torch.set_num_threads(threads)


def same_pixel_statistics():
    g = torch.Generator().manual_seed(6)
    images = [(255 * smooth_image(96, 96, seed=s)[0]).to(torch.uint8) for s in range(16)]
    parts = adam.anatomy_parts(96, 96, 2)
    items = [(i % 16, int(torch.randint(2**62, (), generator=g))) for i in range(128)]
    r = torch.stack([torch.stack(adam.AdamViews(images, 2, 48)[it]) for it in items]) / 255  # 128 x 2 x 1 x 48 x 48
    boxes = torch.tensor([parts[torch.randint(4, (), generator=torch.Generator().manual_seed(s))] for _, s in items])
    q, k = gpu_views.BatchViews(48)(torch.stack([images[i] for i, _ in items]), boxes, torch.tensor([s for _, s in items]))
    b = torch.stack([q, k], 1)                                                          # 128 x 2 x 1 x 48 x 48
    for stat in (lambda y: y.mean((2, 3, 4)), lambda y: y.std((2, 3, 4))):             # 128 x 2 each
        sr, sb = stat(r), stat(b)
        d = sr.mean(1) - sb.mean(1)
        assert abs(d.mean()) < 5 * d.std() / math.sqrt(len(d))
        ratio = (sr[:, 0] - sr[:, 1]).var() / (sb[:, 0] - sb[:, 1]).var()
        assert 0.5 < ratio < 2, ratio


def test_crop_scale_and_jitter_flags_reach_the_drawn_parameters():
    """adam.py --crop-scale / --jitter: crops of at least that share of the part (up to the fallback's rounding), and
    no jitter at 0; the paper's values draw what the tests above check against torchvision."""
    bv = gpu_views.BatchViews(32, crop_scale=0.6, jitter=0.0)
    p = bv.draw(torch.tensor([[0, 0, 64, 64]] * 50), torch.arange(50))          # B x 2 x 14
    area = p[..., gpu_views.CROP][..., 2] * p[..., gpu_views.CROP][..., 3]
    assert area.min() >= 0.6 * 64 * 64 * 0.95
    assert torch.equal(p[..., gpu_views.JITTER], torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=p.dtype).expand_as(
        p[..., gpu_views.JITTER]))
    paper = gpu_views.BatchViews(32).draw(torch.tensor([[0, 0, 64, 64]] * 50), torch.arange(50))
    assert (paper[..., gpu_views.JITTER] != torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=p.dtype)).any()
