"""The view probes of README "Ablations" (a lead on the demo-scale collapse): the demo's MoCo-v2 stage (level 0,
no pruning, 5 epochs x 21 steps) with adam.AdamViews' view pipeline replaced. The Gaussian blur is left out in
every mode; MODE's words switch the rest: "crop" = crop scale 0.5-1 instead of 0.2-1, "norot" = no rotation,
"nojitter" = no colour jitter.

    python docs/probe_views.py crop_nojitter        # -> runs/probe_views/crop_nojitter (log.jsonl, curves.png)
"""
import sys
from pathlib import Path

import torchvision.transforms.v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adam  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "crop_nojitter"
original_init = adam.AdamViews.__init__


def probe_init(self, images, level, img_size, *rest):
    original_init(self, images, level, img_size, *rest)
    views = [T.RandomResizedCrop(img_size, scale=(0.5, 1.0) if "crop" in mode else (0.2, 1.0), antialias=True)]
    if "nojitter" not in mode:
        views.append(T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8))
    if "norot" not in mode:
        views.append(T.RandomRotation(30))
    self.view = T.Compose(views)  # uint8 views, as AdamViews' own


adam.AdamViews.__init__ = probe_init
adam.main(["--levels", "0", "--threshold", "1", "--epochs", "5", "--out", f"runs/probe_views/{mode}", "--overwrite",
           "--print-freq", "100"] + sys.argv[2:])
