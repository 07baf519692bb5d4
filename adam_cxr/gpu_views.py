"""Both views of a whole batch on its device (`adam.py --gpu-views`): the augmentation of adam.AdamViews
(docs/METHOD.md §3), batched. AdamViews, torchvision's per-sample transforms, is the readable reference;
tests/test_gpu_views.py checks every step of BatchViews against it.

Per-sample torchvision on CPU workers makes far fewer images per second than a GPU trains on (README.md,
"Input pipeline speed"; time yours with `python bench.py pipeline`). With --gpu-views the workers return
the full cached image, the AD's part box and a seed; BatchViews draws every random parameter on the CPU
from that seed (the same on any device) and then transforms the whole batch with tensor ops.
Differences from the per-sample reference, all small:
- crop, resize and rotation are ONE bilinear interpolation in float (the reference does four in uint8,
  rounding between them) and the rotation is bilinear (RandomRotation's default is nearest);
- shrinking reads from a 2x, 4x, ... mean-pooled copy (a mip level) instead of torchvision's antialias
  filter; the blur sees the real pixels around the crop where the reference reflects at its edge;
- contrast uses the mean of the crop's pixels that stay in view after the rotation (ref.: all of them).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from adam import imagenet_normalise


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


def sample_mip(x, grid, step):
    """F.grid_sample (bilinear) of x (B x C x H x W) at grid (B x S x S x 2), reading sample i from x pooled
    2^l times, l = round(log2(step_i)), step = source pixels per output pixel: a cheap stand-in for the
    antialiasing of torchvision's resize (plain bilinear aliases when it shrinks by more than ~1.4).
    Exact coordinates for even sizes (2x2 means keep the normalised pixel centres). Loops over levels only."""
    levels = step.log2().round().clamp(min=0).long().tolist()
    out = x.new_empty(x.shape[0], x.shape[1], grid.shape[1], grid.shape[2])  # B x C x S x S
    for level in sorted(set(levels)):
        idx = torch.tensor([i for i, l in enumerate(levels) if l == level], device=x.device)
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
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h) % 6
    return v - c * torch.minimum(k, 4 - k).clamp(0, 1)                            # HSV -> RGB


class BatchViews(nn.Module):
    """Two views (docs/METHOD.md §3) of one AD part per sample, for a batch: forward(x, boxes, seeds) -> (x_q, x_k).

    x: B x C x H x W uint8 full images (C = 1 or 3, any device), boxes: B x 4 (top, left, h, w) the parts,
    seeds: B int64. Per view and sample (parameters from a CPU generator seeded by the sample's seed):
      1. random resized crop in the part (scale 0.2-1, ratio 3/4-4/3) + rotation +-30 deg: one affine map,
         one F.grid_sample of the full image; what the rotation brings in from outside the crop is 0;
      2. colour jitter with p = 0.8: brightness, contrast, saturation 0.4, hue 0.1, in random order
         (saturation and hue leave grey unchanged, so grey images skip them);
      3. Gaussian blur with p = 0.5, sigma ~ U(0.1, 2.0) * S/224, kernel 2 round(11 S/224) + 1;
      4. grey -> 3 channels, ImageNet mean/std. Returns two B x 3 x S x S float32 tensors on x's device."""

    def __init__(self, img_size):
        super().__init__()
        s = img_size / 224  # blur kernel and sigma scale with the view size, as in AdamViews
        self.size, self.sigma, self.radius = img_size, (0.1 * s, 2.0 * s), round(11 * s)

    def draw(self, boxes, seeds):
        """The random parameters of both views, on the CPU: two dicts of tensors, one row per sample.
        crop: B x 4 (top, left, h, w) image pixels; angle: B degrees; jitter: B x 4 factors (brightness,
        contrast, saturation, hue; identities when not applied); order: B x 4 op ids; sigma: B (0 = no blur)."""
        views = [{"crop": [], "angle": [], "jitter": [], "order": [], "sigma": []} for _ in range(2)]
        for (top, left, h, w), seed in zip(boxes.tolist(), seeds.tolist()):
            g = torch.Generator().manual_seed(seed)
            for p, u in zip(views, torch.rand(2, 34, generator=g, dtype=torch.float64).tolist()):
                i, j, ch, cw = random_crop_box(h, w, u[:22])
                p["crop"].append((top + i, left + j, ch, cw))
                p["angle"].append(-30 + 60 * u[22])
                p["jitter"].append((0.6 + 0.8 * u[24], 0.6 + 0.8 * u[25], 0.6 + 0.8 * u[26], -0.1 + 0.2 * u[27])
                                   if u[23] < 0.8 else (1.0, 1.0, 1.0, 0.0))
                p["order"].append(sorted(range(4), key=lambda op: u[28 + op]))  # a uniform permutation
                p["sigma"].append(self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[33] if u[32] < 0.5 else 0.0)
        return [{k: torch.tensor(v, dtype=torch.float32 if k != "order" else torch.int64)
                 for k, v in p.items()} for p in views]

    @torch.no_grad()
    def forward(self, x, boxes, seeds):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"BatchViews: x must be B x C x H x W uint8, C = 1 or 3; got {x.dtype} {tuple(x.shape)}")
        if boxes.shape != (x.shape[0], 4) or seeds.shape != (x.shape[0],):
            raise ValueError(f"BatchViews: boxes must be B x 4 and seeds B for B = {x.shape[0]}, "
                             f"got {tuple(boxes.shape)} and {tuple(seeds.shape)}")
        x = x.float() / 255                                                  # B x C x H x W in [0, 1]
        p_q, p_k = self.draw(boxes, seeds)
        return self.views_with(x, p_q), self.views_with(x, p_k)

    def views_with(self, x, p):
        """One view of each sample with given parameters p (see draw). x: B x C x H x W float in [0, 1]."""
        B, C, H, W = x.shape
        S, dev = self.size, x.device
        top, left, h, w = p["crop"].to(dev).unbind(1)                        # B each
        a = p["angle"].to(dev) * math.pi / 180
        zero = torch.zeros_like(a)
        # rotation (inverse map, as torchvision's rotate): view -> resized crop, both [-1, 1] and square
        rot = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1)
        g = F.affine_grid(rot, [B, 1, S, S], align_corners=False)            # B x S x S x 2 (x, y)
        # resized crop -> image: [-1, 1] of the crop spans pixels left .. left + w - 1 (centres), likewise y
        scale = torch.stack([w / W, h / H], 1).view(B, 1, 1, 2)
        shift = torch.stack([(2 * left + w) / W - 1, (2 * top + h) / H - 1], 1).view(B, 1, 1, 2)
        step = p["crop"][:, 2:].amax(1) / S                                  # source px per view px (CPU)
        y = sample_mip(x, g * scale + shift, step)                          # B x C x S x S
        # torchvision's rotate fills 0 where its bilinear reads outside the crop: the same weight here
        u = ((g + 1) * S - 1) / 2                                            # crop pixel coordinates
        mask = torch.minimum(u + 1, S - u).clamp(0, 1).prod(-1).unsqueeze(1)  # B x 1 x S x S
        y = self.jitter(y, p["jitter"].to(dev), p["order"], mask)
        y = self.blur(y, p["sigma"]) * mask
        return imagenet_normalise(y)                                         # B x 3 x S x S

    @staticmethod
    def jitter(x, factors, order, mask=None):
        """ColorJitter with per-sample factors (B x 4: brightness, contrast, saturation, hue) applied in
        per-sample order (B x 4 op ids), as torchvision.transforms.v2.functional on float images: x: B x C x
        H x W in [0, 1]. Contrast's mean is over mask (B x 1 x H x W weights) when given. order on the CPU:
        choosing the ops then needs no device sync."""
        bri, con, sat, hue = factors.view(-1, 4, 1, 1, 1).unbind(1)         # B x 1 x 1 x 1 each
        grey = (lambda y: y) if x.shape[1] == 1 else \
            (lambda y: (0.2989 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1))
        weight = torch.ones_like(x[:, :1]) if mask is None else mask
        mean = lambda y: (grey(y) * weight).sum((1, 2, 3), keepdim=True) / weight.sum((1, 2, 3), keepdim=True)
        ops = [lambda y: (bri * y).clamp(0, 1),
               lambda y: (con * y + (1 - con) * mean(y)).clamp(0, 1),
               lambda y: (sat * y + (1 - sat) * grey(y)).clamp(0, 1),
               lambda y: hue_shift(y, hue)]
        for slot in range(4):
            for op in range(2 if x.shape[1] == 1 else 4):                    # grey: saturation, hue = identity
                pick = order[:, slot].cpu() == op
                if pick.any():
                    x = torch.where(pick.to(x.device).view(-1, 1, 1, 1), ops[op](x), x)
        return x

    def blur(self, x, sigma):
        """Gaussian blur of the samples with sigma > 0 (B; 0 = leave as is), reflect padding, torchvision's
        kernel: one grouped separable convolution with a kernel per sample. x: B x C x S x S float."""
        sigma = sigma.cpu()                                                  # choosing samples: no device sync
        on = (sigma > 0).nonzero().squeeze(1)
        if len(on) == 0:
            return x
        n, C, Hs, Ws = len(on), *x.shape[1:]
        r = self.radius
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        k = torch.softmax(-(t / sigma[on, None].to(x.device)) ** 2 / 2, dim=1).repeat_interleave(C, 0)  # nC x (2r+1)
        on = on.to(x.device)
        y = F.pad(x[on].reshape(1, n * C, Hs, Ws), (r, r, r, r), mode="reflect")
        y = F.conv2d(y, k.view(n * C, 1, 1, -1), groups=n * C)              # along x
        y = F.conv2d(y, k.view(n * C, 1, -1, 1), groups=n * C)              # along y
        x = x.clone()
        x[on] = y.view(n, C, Hs, Ws)
        return x
