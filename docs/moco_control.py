"""The positive control of docs/learning.md: an independent minimal MoCo-v2 (plain torchvision and torch, none of
adam.py's code) on the known-answer shapes, with MoCo v2's views, the demo's budget and the same frozen probes.
If it learns where adam.py does not, the defect is in adam.py; if neither does, the recipe or the scale is the cause.

    python docs/moco_control.py STEPS [K] [lr]          # e.g. 1120 256 0.03: 20 epochs of the 1,799 train images
"""
import copy
import json
import math
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F, torchvision
from torchvision.transforms import v2 as T
import data_prep
import known_answer
from adam_cxr import shapes

steps = int(sys.argv[1])
K = int(sys.argv[2]) if len(sys.argv) > 2 else 256
lr = float(sys.argv[3]) if len(sys.argv) > 3 else 0.03
size = 32; B = 32; m = 0.99; tau = 0.2
torch.manual_seed(0)
cache = data_prep.open_cache(shapes.build_shapes(Path("data/shapes/n3000_s32_c4"), 3000, size, copies=4))
imgs = torch.as_tensor(np.array(cache.images[cache.rows("train")]))[:, None]   # N x 1 x S x S uint8
view = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                  T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                  T.RandomApply([T.GaussianBlur(5, sigma=(0.1 * size / 224, 2.0 * size / 224))], p=0.5),
                  T.RandomRotation(30), T.ToDtype(torch.float32, scale=True)])
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1); std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
norm = lambda x: (x.expand(-1, 3, -1, -1) - mean) / std

class Net(nn.Module):
    def __init__(s):
        super().__init__(); s.backbone = torchvision.models.resnet18(weights=None); s.backbone.fc = nn.Identity()
        s.head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    def forward(s, x): return F.normalize(s.head(s.backbone(x)), dim=1)

q_net = Net(); k_net = copy.deepcopy(q_net).requires_grad_(False)
queue = F.normalize(torch.randn(K, 128), dim=1); ptr = 0
opt = torch.optim.SGD(q_net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
t0 = time.time(); losses = []
for step in range(steps):
    for g in opt.param_groups: g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
    idx = torch.randint(len(imgs), (B,))
    xq = norm(torch.stack([view(imgs[i]) for i in idx])); xk = norm(torch.stack([view(imgs[i]) for i in idx]))
    q = q_net(xq)
    with torch.no_grad():
        k = k_net(xk)                   # plain BN, no shuffle: one process, as the simplest MoCo
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / tau
    loss = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
    opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        for a, b in zip(k_net.parameters(), q_net.parameters()): a.mul_(m).add_(b, alpha=1 - m)
        queue[(ptr + torch.arange(B)) % K] = k; ptr = (ptr + B) % K
    losses.append(loss.item())
    if (step + 1) % 56 == 0:
        print(f"step {step+1} loss {np.mean(losses[-56:]):.3f} {(step+1)*B/(time.time()-t0):.0f} img/s", flush=True)
res = known_answer.class_probes(q_net.backbone, cache, size)
rnd = known_answer.class_probes(known_answer.backbone("resnet18", seed=0), cache, size)
print(json.dumps({"steps": steps, "K": K, "lr": lr, "pretrained": res, "random init": rnd}))
