"""Both views of a whole batch on its device (`adam.py --views device`): the augmentation of adam.AdamViews
(docs/METHOD.md §3), batched. AdamViews, torchvision's per-sample transforms, is the readable reference;
tests/test_gpu_views.py checks every step of BatchViews against it.

Per-sample torchvision on CPU workers makes far fewer images per second than a GPU trains on (docs/gpu.md; time
yours with `python bench.py train`). With device views the workers return the AD's part (uint8) and the random
parameters of both views, drawn on the CPU from the sample's seed (the same on any device, see draw); BatchViews
then transforms the whole batch with tensor ops and returns views in [0, 1] (adam.py normalises them).
Differences from the per-sample reference, all small:
- crop, resize and rotation are ONE bilinear interpolation in float (the reference does four in uint8,
  rounding between them) and the rotation is bilinear (RandomRotation's default is nearest);
- shrinking reads from a 2x, 4x, ... mean-pooled copy (a mip level) instead of torchvision's antialias
  filter; the blur sees the real pixels around the crop where the reference reflects at its edge;
- bilinear reads beyond the crop see the part's real pixels, and at the part's edge its edge pixels (adam.py ships
  the part alone), where torchvision clamps at the crop's edge;
- contrast uses the mean of the crop's pixels that stay in view after the rotation (ref.: all of them).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def random_crop_box(height, width, u, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params (10 tries, then the central fallback) driven by 22
    uniforms u in [0, 1) instead of the global generator. Returns (top, left, h, w) inside height x width."""
    area, log_r = height * width, (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[2 * t + 1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w
    if width / height < ratio[0]:    # fallback: the central crop with the nearest allowed ratio
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_device(t, device):
    """A small host tensor (parameters, indices) -> device without a host sync: a blocking host-to-device copy
    first waits for every kernel queued before it. From pinned memory (the loader's, or pinned here), non_blocking;
    the caching host allocator keeps the pinned block until the copy has run."""
    if device.type != "cuda":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def sample_mip(x, grid, step):
    """F.grid_sample (bilinear) of x (B x C x H x W) at grid (B x S x S x 2), reading sample i from x pooled
    2^l times, l = round(log2(step_i)), step = source pixels per output pixel: a cheap stand-in for the
    antialiasing of torchvision's resize (plain bilinear aliases when it shrinks by more than ~1.4).
    Exact coordinates for even sizes (2x2 means keep the normalised pixel centres). Loops over levels only."""
    levels = step.log2().round().clamp(min=0).long().tolist()
    out = x.new_empty(x.shape[0], x.shape[1], grid.shape[1], grid.shape[2])  # B x C x S x S
    for level in sorted(set(levels)):
        idx = to_device(torch.tensor([i for i, l in enumerate(levels) if l == level]), x.device)
        src = x if len(idx) == len(levels) else x[idx]                  # one level for all: no copy
        for _ in range(level):
            src = F.avg_pool2d(src, 2)
        out[idx] = F.grid_sample(src, grid[idx], mode="bilinear", padding_mode="border", align_corners=False)
    return out


def hue_shift(x, shift):
    """torchvision's adjust_hue on float RGB: to HSV, h <- (h + shift) mod 1, back. x: B x 3 x H x W, shift: B."""
    v = x.amax(1, keepdim=True)                                                     # value
    c = v - x.amin(1, keepdim=True)                                                 # chroma
    r, g, b = x.unbind(1)
    v0, d = v.squeeze(1), c.squeeze(1).clamp(min=1e-12)  # c = 0: grey, any hue gives the same pixel
    h = torch.where(v0 == r, (g - b) / d, torch.where(v0 == g, (b - r) / d + 2, (r - g) / d + 4))
    h = (h.unsqueeze(1) / 6 + shift.view(-1, 1, 1, 1)) % 1                          # B x 1 x H x W, turns
    k = (to_device(torch.tensor([5.0, 3.0, 1.0]), x.device).view(1, 3, 1, 1) + 6 * h) % 6
    return v - c * torch.minimum(k, 4 - k).clamp(0, 1)                            # HSV -> RGB


# The parameters of one view of one sample, a row of BatchViews.draw: the crop box in x (top, left, h, w), the
# rotation in degrees, the jitter's factors (brightness, contrast, saturation, hue; identities when not applied)
# and its order (op ids), the blur's sigma (0 = no blur). One float64 row (integers and float32 values exact), so
# that a worker ships, and the device receives, one tensor per batch.
CROP, ANGLE, JITTER, ORDER, SIGMA = slice(0, 4), 4, slice(5, 9), slice(9, 13), 13


class BatchViews(nn.Module):
    """Two views (docs/METHOD.md §3) of one AD part per sample, for a batch: forward(x, boxes, seeds) -> (x_q, x_k),
    or make(x, params) with parameters drawn before (adam.py draws them in the DataLoader workers).

    x: B x C x H x W uint8 images or parts (C = 1 or 3, any device), boxes: B x 4 (top, left, h, w) the parts in
    x, seeds: B int64. Per view and sample (parameters from a CPU generator seeded by the sample's seed):
      1. random resized crop in the part (scale 0.2-1, ratio 3/4-4/3) + rotation +-30 deg: one affine map,
         one F.grid_sample of x; what the rotation brings in from outside the crop is 0;
      2. colour jitter with p = 0.8: brightness, contrast, saturation 0.4, hue 0.1, in random order
         (saturation and hue leave grey unchanged, so grey images skip them);
      3. Gaussian blur with p = 0.5, sigma ~ U(0.1, 2.0) * S/224, kernel 2 round(11 S/224) + 1.
    Returns two B x C x S x S float32 tensors in [0, 1] on x's device (adam.imagenet_normalise follows).
    No host sync: the parameters stay on the host where a choice depends on them, and reach the device by
    non_blocking copies (to_device), so the host can queue the next step while the device runs this one."""

    def __init__(self, img_size, crop_scale=0.2, jitter=0.4):
        super().__init__()
        s = img_size / 224  # blur kernel and sigma scale with the view size, as in AdamViews
        self.size, self.sigma, self.radius = img_size, (0.1 * s, 2.0 * s), round(11 * s)
        self.crop_scale, self.jitter_strength = crop_scale, jitter  # adam.py --crop-scale, --jitter (paper: 0.2, 0.4)

    def draw(self, boxes, seeds):
        """The random parameters of both views, on the CPU: B x 2 x 14 float64, a row per sample and view in the
        layout of CROP, ANGLE, JITTER, ORDER, SIGMA. boxes: B x 4 parts in x, seeds: B. One generator per sample,
        seeded by its seed: the same parameters on any device, in any batch, in a worker or not."""
        rows = []
        for (top, left, h, w), seed in zip(boxes.tolist(), seeds.tolist()):
            g = torch.Generator().manual_seed(seed)
            for u in torch.rand(2, 34, generator=g, dtype=torch.float64).tolist():
                i, j, ch, cw = random_crop_box(h, w, u[:22], scale=(self.crop_scale, 1.0))
                a = self.jitter_strength          # factors in [1 - a, 1 + a], hue in [-a/4, a/4], as ColorJitter
                jitter = (1 - a + 2 * a * u[24], 1 - a + 2 * a * u[25], 1 - a + 2 * a * u[26], -a / 4 + a / 2 * u[27]) \
                    if u[23] < 0.8 and a > 0 else (1.0, 1.0, 1.0, 0.0)
                order = sorted(range(4), key=lambda op: u[28 + op])  # a uniform permutation
                sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[33] if u[32] < 0.5 else 0.0
                rows.append((top + i, left + j, ch, cw, -30 + 60 * u[22], *jitter, *order, sigma))
        return torch.tensor(rows, dtype=torch.float64).view(len(seeds), 2, 14)

    def forward(self, x, boxes, seeds):
        if boxes.shape != (x.shape[0], 4) or seeds.shape != (x.shape[0],):
            raise ValueError(f"BatchViews: boxes must be B x 4 and seeds B for B = {x.shape[0]}, "
                             f"got {tuple(boxes.shape)} and {tuple(seeds.shape)}")
        return self.make(x, self.draw(boxes, seeds))

    @torch.no_grad()
    def make(self, x, params):
        """Both views of x (B x C x H x W uint8) with the parameters of draw (B x 2 x 14, on the host; pinned, the
        loader's, they reach the device in one non_blocking copy)."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"BatchViews: x must be B x C x H x W uint8, C = 1 or 3; got {x.dtype} {tuple(x.shape)}")
        if params.shape != (x.shape[0], 2, 14):
            raise ValueError(f"BatchViews: params must be B x 2 x 14 for B = {x.shape[0]}, got {tuple(params.shape)}")
        x = x.float() / 255                                                  # B x C x H x W in [0, 1]
        on_device = to_device(params, x.device).float()
        return tuple(self.views_with(x, params[:, v], on_device[:, v]) for v in (0, 1))

    def views_with(self, x, p, p_dev=None):
        """One view of each sample with parameters p (B x 14 host rows, see draw; p_dev: the same on x's device).
        x: B x C x H x W float in [0, 1]."""
        B, C, H, W = x.shape
        S, dev = self.size, x.device
        p_dev = to_device(p, dev).float() if p_dev is None else p_dev
        top, left, h, w = p_dev[:, CROP].unbind(1)                           # B each
        a = p_dev[:, ANGLE] * math.pi / 180
        zero = torch.zeros_like(a)
        # rotation (inverse map, as torchvision's rotate): view -> resized crop, both [-1, 1] and square
        rot = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1)
        g = F.affine_grid(rot, [B, 1, S, S], align_corners=False)            # B x S x S x 2 (x, y)
        # resized crop -> image: [-1, 1] of the crop spans pixels left .. left + w - 1 (centres), likewise y
        scale = torch.stack([w / W, h / H], 1).view(B, 1, 1, 2)
        shift = torch.stack([(2 * left + w) / W - 1, (2 * top + h) / H - 1], 1).view(B, 1, 1, 2)
        step = p[:, CROP][:, 2:].amax(1) / S                                 # source px per view px (host)
        y = sample_mip(x, g * scale + shift, step)                          # B x C x S x S
        # torchvision's rotate fills 0 where its bilinear reads outside the crop: the same weight here
        u = ((g + 1) * S - 1) / 2                                            # crop pixel coordinates
        mask = torch.minimum(u + 1, S - u).clamp(0, 1).prod(-1).unsqueeze(1)  # B x 1 x S x S
        y = self.jitter(y, p_dev[:, JITTER], p[:, ORDER].long(), mask, p_dev[:, ORDER].long())
        return self.blur(y, p[:, SIGMA]) * mask                             # B x C x S x S in [0, 1]

    @staticmethod
    def jitter(x, factors, order, mask=None, order_dev=None):
        """ColorJitter with per-sample factors (B x 4: brightness, contrast, saturation, hue) applied in
        per-sample order (B x 4 op ids), as torchvision.transforms.v2.functional on float images: x: B x C x
        H x W in [0, 1]. Contrast's mean is over mask (B x 1 x H x W weights) when given. order on the CPU:
        choosing the ops then needs no device sync; its copy on the device (order_dev) selects each sample's op."""
        bri, con, sat, hue = factors.reshape(-1, 4, 1, 1, 1).unbind(1)      # B x 1 x 1 x 1 each
        grey = (lambda y: y) if x.shape[1] == 1 else \
            (lambda y: (0.2989 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1))
        weight = torch.ones_like(x[:, :1]) if mask is None else mask
        mean = lambda y: (grey(y) * weight).sum((1, 2, 3), keepdim=True) / weight.sum((1, 2, 3), keepdim=True)
        ops = [lambda y: (bri * y).clamp(0, 1),
               lambda y: (con * y + (1 - con) * mean(y)).clamp(0, 1),
               lambda y: (sat * y + (1 - sat) * grey(y)).clamp(0, 1),
               lambda y: hue_shift(y, hue)]
        order_dev = to_device(order, x.device) if order_dev is None else order_dev
        for slot in range(4):
            for op in range(2 if x.shape[1] == 1 else 4):                    # grey: saturation, hue = identity
                if (order[:, slot].cpu() == op).any():
                    x = torch.where((order_dev[:, slot] == op).view(-1, 1, 1, 1), ops[op](x), x)
        return x

    def blur(self, x, sigma):
        """Gaussian blur of the samples with sigma > 0 (B; 0 = leave as is), reflect padding, torchvision's
        kernel: one grouped separable convolution with a kernel per sample. x: B x C x S x S float."""
        sigma = sigma.cpu().to(x.dtype)                                      # choosing samples: no device sync
        on = (sigma > 0).nonzero().squeeze(1)
        if len(on) == 0:
            return x
        n, C, Hs, Ws = len(on), *x.shape[1:]
        r = self.radius
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        k = torch.softmax(-(t / to_device(sigma[on, None], x.device)) ** 2 / 2, dim=1).repeat_interleave(C, 0)  # nC x (2r+1)
        on = to_device(on, x.device)
        y = F.pad(x[on].reshape(1, n * C, Hs, Ws), (r, r, r, r), mode="reflect")
        y = F.conv2d(y, k.view(n * C, 1, 1, -1), groups=n * C)              # along x
        y = F.conv2d(y, k.view(n * C, 1, -1, 1), groups=n * C)              # along y
        x = x.clone()
        x[on] = y.view(n, C, Hs, Ws)
        return x
