"""Bad input, tried as a careless or hostile user would. Each row of ROWS is one try: the command, the one line it
must end with (no traceback), and what must not have changed (nothing lost) or not have appeared (nothing half
written). The tries that need more than one command follow: a diverging run keeping its last good checkpoint, a
kill between the log line and the checkpoint, a second process on the same folder, a full disk (a small tmpfs
where this machine lets us mount one, else a simulated write failure), the one image reader, caches and lists."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ablate
import adam
import data_prep as dp
import eve
import finetune
from adam_cxr import runs, safe_files
from helpers import ROOT, TINY_RUN, make_cxr14

# What each script's `if __name__ == "__main__"` turns into one line (argparse errors exit by themselves).
ONE_LINE = {adam: (OSError, ValueError, dp.DataError), finetune: (OSError, ValueError, dp.DataError),
            eve: (OSError, ValueError, dp.DataError), ablate: (OSError, ValueError, dp.DataError)}
HUGE_SEED = str(2**70)
FT = ["--task", "phantom-heart", "--arch", "resnet18", "--img-size", "32", "--epochs", "1", "--min-iters", "1",
      "--val-images", "2", "--shots", "3", "--save", "none", "--device", "cpu"]   # the smallest fine-tune
EVE = ["--arch", "resnet18", "--img-size", "16", "--num-images", "3", "--what", "compositionality", "--parts", "2",
       "--num-patches", "3", "--device", "cpu"]                                 # the smallest Eve run
ELSEWHERE = {"path": "/elsewhere/phantom", "images": 99, "sha256": "0" * 16}   # the identity of other data


class Payload:
    """A pickle that would create `marker` when loaded: loading must refuse it before running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def d(tiny_adam_run, phantom_root, tmp_path_factory):
    """The bad inputs, made once: a NaN run, a pickle payload, a foreign checkpoint, unfinished and nested caches,
    data_prep's temporary folder, a folder that is not a cache, a ChestX-ray14 table with ';' separators."""
    base = tmp_path_factory.mktemp("bad")
    w = SimpleNamespace(base=base, run=tiny_adam_run, phantom=phantom_root, marker=base / "PAYLOAD_RAN")
    w.tiny = TINY_RUN + ["--data-root", str(phantom_root)]
    w.nan_run = base / "nan_run"
    w.nan_run.mkdir()
    ckpt = torch.load(tiny_adam_run / "checkpoint.pth", weights_only=True)
    ckpt["student"]["backbone.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, w.nan_run / "checkpoint.pth")
    export = torch.load(tiny_adam_run / "adam_resnet18_level2.pth", weights_only=True)
    export["layer1.0.bn1.running_var"][3] = float("inf")
    torch.save(export, w.nan_run / "adam_resnet18_level2.pth")
    w.evil = base / "evil"
    w.evil.mkdir()
    torch.save({"args": {}, "student": Payload(w.marker)}, w.evil / "checkpoint.pth")
    w.mid = base / "mid"                                # a run stopped after epoch 1 of 2
    w.mid.mkdir()
    ckpt["student"]["backbone.conv1.weight"][0, 0, 0, 0] = 0.0
    torch.save(dict(ckpt, stage=0, level=0, epoch=1, args=dict(ckpt["args"], epochs=2)), w.mid / "checkpoint.pth")
    w.foreign = base / "foreign"                        # a fine-tuning checkpoint given to --resume
    w.foreign.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, w.foreign / "checkpoint.pth")
    w.unfinished = base / "unfinished"                   # a cache whose conversion was killed: no meta.json
    shutil.copytree(phantom_root, w.unfinished)
    (w.unfinished / "meta.json").unlink()
    w.tmpfolder = base / ".phantom.tmp-999999999"        # data_prep's temporary folder given as --data
    shutil.copytree(phantom_root / "png", w.tmpfolder)
    w.holder = base / "holder"                           # a folder holding a cache (and its test images)
    shutil.copytree(phantom_root, w.holder / "phantom")
    w.badmeta = base / "badmeta"
    shutil.copytree(phantom_root, w.badmeta)
    (w.badmeta / "meta.json").write_text("{not json")
    w.notcache = base / "notcache"
    w.notcache.mkdir()
    (w.notcache / "thesis.tex").write_text("months of work")
    w.semicolon = base / "cxr_semicolon"
    (w.semicolon / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(w.semicolon / "images" / "00000001_000.png")
    (w.semicolon / "Data_Entry_2017.csv").write_text("Image Index;Finding Labels;Patient ID\n"
                                                     "00000001_000.png;No Finding;1\n")
    (w.semicolon / "train_val_list.txt").write_text("00000001_000.png\n")
    (w.semicolon / "test_list.txt").write_text("")
    w.nocols = base / "cxr_nocols"
    shutil.copytree(w.semicolon, w.nocols)
    (w.nocols / "Data_Entry_2017.csv").write_text("Image,Labels\n00000001_000.png,No Finding\n")
    _data_prep_inputs(w)
    w.file = base / "a_file"                             # --out pointing at a file
    w.file.write_text("not a folder")
    w.other = Path(dp.ensure_phantom(base / "other" / "phantom", num_images=40, size=64, seed=1))  # other data
    w.nopos = base / "nopos"                             # a cache whose test split has no positive of any label
    shutil.copytree(phantom_root, w.nopos)
    index = (w.nopos / "index.csv").read_text().splitlines()
    (w.nopos / "index.csv").write_text("\n".join(index[:1] + [re.sub(r",test,.*$", ",test,", line)
                                                             for line in index[1:]]) + "\n")
    w.json_shapes = base / "json_shapes"                 # outputs of another shape in each script's --out
    for name, text in (("ft", "{\"not\": \"a list of records\"}"), ("eve", "[1, 2]"), ("abl", "{\"runs\": 3}")):
        (w.json_shapes / name).mkdir(parents=True)
        (w.json_shapes / name / {"ft": "results.json", "eve": "eve.json", "abl": "ablation.json"}[name]).write_text(text)
    here = runs.data_identity(phantom_root)
    config = finetune._config(finetune.get_args(FT))
    record = dict(task="phantom-heart", init="random", init_spec="random", shots=3, seed=9, metric="dice", value=50.0,
                  **config)
    w.ft_rerun = base / "ft_rerun"                       # results.json of earlier runs a rerun must not mix with
    for name, r in (("data", dict(record, data=ELSEWHERE)), ("lr", dict(record, data=here, lr=0.5)),
                    ("init", dict(record, data=here, init="adam", init_spec="adam:/some/run"))):
        (w.ft_rerun / name).mkdir(parents=True)
        (w.ft_rerun / name / "results.json").write_text(json.dumps([r]))
    earlier = dict(results={}, figures={}, settings=eve.settings_of(eve.get_args(EVE)), data=here)
    w.eve_rerun = base / "eve_rerun"
    for name, e in (("data", dict(earlier, data=ELSEWHERE)), ("img", dict(earlier, settings=dict(
            earlier["settings"], img_size=64)))):
        (w.eve_rerun / name).mkdir(parents=True)
        (w.eve_rerun / name / "eve.json").write_text(json.dumps(e))
    w.abl_rerun = base / "abl_rerun"                     # a smoke ablation recorded on other data
    w.abl_rerun.mkdir()
    (w.abl_rerun / "ablation.json").write_text(json.dumps(dict(scale="smoke", settings=dict(
        seeds=2, draws=1, root=ELSEWHERE["path"], data=ELSEWHERE), runs=[])))
    return w


def _data_prep_inputs(w):
    """The table converter's and the image reader's bad inputs: images with tables whose rows are short, long, or
    whose header names a column twice, a Latin-1 table, a 1x1 px image, a file name that is not UTF-8."""
    w.tables = w.base / "tables"
    w.tables.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20), 60 * i, np.uint8)).save(w.tables / f"{i}.png")
    for name, text in (("short", "image,A,B\n0.png,1,0\n1.png,1\n2.png,0,1\n"),
                       ("long", "image,A,B\n0.png,1,0\n1.png,x,1,0\n2.png,0,1\n"),
                       ("twice", "image,A,B,A\n0.png,1,0,0\n1.png,0,1,1\n")):
        (w.tables / f"{name}.csv").write_text(text)
    (w.tables / "latin1.csv").write_bytes("image,A,B\n0.png,1,0\ncaf\xe9.png,0,1\n".encode("latin-1"))
    (w.tables / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Image Index\n0.png,No Finding,1.png\n")
    (w.tables / "train_val_list.txt").write_text("0.png\n")
    (w.tables / "test_list.txt").write_text("")
    w.tiny_image = w.base / "tiny_image"
    shutil.copytree(w.tables, w.tiny_image, ignore=shutil.ignore_patterns("*.csv", "*.txt"))
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(w.tiny_image / "dot.png")
    w.badname = w.base / "badname"
    shutil.copytree(w.tiny_image, w.badname, ignore=shutil.ignore_patterns("dot.png"))
    try:
        shutil.copy(w.tables / "0.png", os.fsencode(w.badname) + b"/caf\xe9.png")   # saved by a Latin-1 system
    except OSError:                                  # a file system that only takes UTF-8 names: nothing to try
        w.badname = None


def _csv(d, table, *flags):
    """data_prep.py csv on d.tables' images and one of its tables."""
    return ["csv", "--src", str(d.tables), "--csv", str(d.tables / table), "--image-col", "image", "--out",
            str(d.out), "--size", "16", "--workers", "1", *flags]


# (id, script, argv from the fixture (d.out: a fresh folder for the row's output), the one line (regex), fixture
# paths that must stay unchanged, paths that must not exist (d's, else under d.out; "" = d.out itself))
ROWS = [
    # flags, checked when parsed
    ("batch-size-0", adam, lambda d: d.tiny + ["--batch-size", "0", "--out", str(d.out)],
     r"argument --batch-size: '0' is not an integer >= 2", [], [""]),
    ("batch-size-1", adam, lambda d: d.tiny + ["--batch-size", "1", "--out", str(d.out)],
     r"argument --batch-size: '1' is not an integer >= 2 \(BatchNorm trains on a batch's statistics\)", [], [""]),
    ("seed-2**70", adam, lambda d: d.tiny + ["--seed", HUGE_SEED, "--out", str(d.out)],
     rf"argument --seed: '{HUGE_SEED}' is not an integer in \[0, 4294967295\]", [], [""]),
    ("out-is-a-file", adam, lambda d: d.tiny + ["--out", str(d.file)],
     r"argument --out: .*a_file is a file, not a folder", ["file"], []),
    ("levels-fine-to-coarse", adam, lambda d: d.tiny + ["--levels", "4,2,0", "--out", str(d.out)],
     r"argument --levels: '4,2,0': levels go coarse to fine, each once \(e.g. 0,2,4\)", [], [""]),
    ("levels-repeated", adam, lambda d: d.tiny + ["--levels", "0,0", "--out", str(d.out)],
     r"argument --levels: '0,0': levels go coarse to fine, each once .* a repeated level would overwrite its exports",
     [], [""]),
    ("queue-size-0", adam, lambda d: d.tiny + ["--queue-size", "0", "--out", str(d.out)],
     r"argument --queue-size: '0' is not an integer >= 1", [], [""]),
    ("print-freq-0", adam, lambda d: d.tiny + ["--print-freq", "0", "--out", str(d.out)],
     r"argument --print-freq: '0' is not an integer >= 1", [], [""]),
    ("steps-negative", adam, lambda d: d.tiny + ["--steps-per-epoch", "-1", "--out", str(d.out)],
     r"argument --steps-per-epoch: '-1' is not an integer >= 1", [], [""]),
    ("epochs-0", adam, lambda d: d.tiny + ["--epochs", "0", "--out", str(d.out)],
     r"argument --epochs: '0' is not an integer >= 1", [], [""]),
    ("threshold-minus-1", adam, lambda d: d.tiny + ["--threshold", "-1", "--out", str(d.out)],
     r"argument --threshold: '-1' is not a cosine in \(-1, 1\] or 'off'", [], [""]),
    ("threshold-nan", adam, lambda d: d.tiny + ["--threshold", "nan", "--out", str(d.out)],
     r"argument --threshold: 'nan' is not a cosine", [], [""]),
    ("lr-overflows-float32", adam, lambda d: d.tiny + ["--lr", "1e300", "--out", str(d.out)],
     r"argument --lr: '1e300' is not a number in \[0, 1e\+30\]", [], [""]),
    ("temperature-0", adam, lambda d: d.tiny + ["--temperature", "0", "--out", str(d.out)],
     r"argument --temperature: '0' is not a number > 0", [], [""]),
    ("levels-syntax", adam, lambda d: d.tiny + ["--levels", "0,two", "--out", str(d.out)],
     r"argument --levels: '0,two': expected comma-separated levels", [], [""]),
    ("levels-too-fine", adam, lambda d: d.tiny + ["--levels", "9", "--out", str(d.out)],
     r"--levels 9: level 9 cuts the 64x64 images .* into parts of 4x2 px, under 1/4 of --img-size 32", [], [""]),
    ("arch-unknown", adam, lambda d: d.tiny + ["--arch", "resnext50", "--out", str(d.out)],
     r"argument --arch: invalid choice: 'resnext50'", [], [""]),
    ("device-cuda-without-gpu", adam, lambda d: d.tiny + ["--device", "cuda", "--out", str(d.out)],
     r"argument --device: cuda: torch sees no CUDA GPU .* use --device cpu", [], [""]),
    # every --resume mismatch, and checkpoints that are not what they claim
    ("resume-arch", adam, lambda d: ["--resume", str(d.run), "--arch", "resnet34"],
     r"--arch resnet34: the run in .* was trained with resnet18; leave the flag out", ["run"], []),
    ("resume-dim", adam, lambda d: ["--resume", str(d.run), "--dim", "64"],
     r"--dim 64: the run in .* was trained with 128", ["run"], []),
    ("resume-queue-size", adam, lambda d: ["--resume", str(d.run), "--queue-size", "30"],
     r"--queue-size 30: the run in .* was trained with 60", ["run"], []),
    ("resume-levels", adam, lambda d: ["--resume", str(d.run), "--levels", "2,4"],
     r"--levels 2,4: the run in .* has trained level\(s\) 0,2; list them first", ["run"], []),
    ("resume-wd-mid-stage", adam, lambda d: ["--resume", str(d.mid), "--wd", "0.1"],
     r"--wd 0.1: the run in .* is in the middle of its level-0 stage, whose optimiser state keeps --wd 0.0001", ["mid"],
     []),
    ("resume-nothing", adam, lambda d: ["--resume", str(d.base)],
     r"--resume: no checkpoint at .*checkpoint.pth", [], []),
    ("resume-foreign", adam, lambda d: ["--resume", str(d.foreign)],
     r"is not an adam.py checkpoint \(no args, stage", ["foreign"], []),
    ("resume-pickle-payload", adam, lambda d: ["--resume", str(d.evil)],
     r"--resume: .*checkpoint.pth is not a plain-data checkpoint: it holds the Python object .*open, which loading "
     r"would run as code, so torch.load\(weights_only=True\) refused it", ["evil"], ["marker"]),
    ("resume-nan", adam, lambda d: ["--resume", str(d.nan_run)],
     r"checkpoint.pth: student.backbone.conv1.weight holds NaN or infinite values", ["nan_run"], []),
    ("resume-other-data", adam, lambda d: ["--resume", str(d.run), "--data-root", str(d.other)],
     r"--data-root .*other/phantom: .*other/phantom \(40 images, sha256 \w+\) is not the data of the run in .* \(.*, "
     r"48 images, sha256 \w+\): pass --data-root .*phantom, or pick another --out", ["run"], []),
    # an --out that holds another run
    ("out-holds-a-run", adam, lambda d: d.tiny + ["--out", str(d.mid)],
     r"--out .*mid holds another run \(checkpoint.pth\): continue it with `--resume .*mid`, pick a new --out, or "
     r"pass --overwrite", ["mid"], []),
    # a folder is a cache only with a valid meta.json; data_prep's temporary folders are never data
    ("data-unfinished-cache", adam, lambda d: d.tiny[:-2] + ["--data", str(d.unfinished), "--out", str(d.out)],
     r"unfinished is an unfinished data_prep.py cache \(images.npy but no meta.json", ["unfinished"], [""]),
    ("data-temporary-folder", adam, lambda d: d.tiny[:-2] + ["--data", str(d.tmpfolder), "--out", str(d.out)],
     r"data_prep.py's temporary folder of .*phantom \(a conversion still running, or killed\)", [], [""]),
    ("data-holds-a-cache", adam, lambda d: d.tiny[:-2] + ["--data", str(d.holder), "--out", str(d.out)],
     r"holder/phantom inside it is a data_prep.py cache; pass --data .*holder/phantom", ["holder"], [""]),
    ("data-bad-meta", adam, lambda d: d.tiny[:-2] + ["--data", str(d.badmeta), "--out", str(d.out)],
     r"badmeta/meta.json: not valid JSON", ["badmeta"], [""]),
    # divergence stops the run before it writes; loaders refuse non-finite weights by name
    ("lr-1e30", adam, lambda d: d.tiny + ["--lr", "1e30", "--out", str(d.out)],
     r"the loss is not finite in stage 1 \(level 0\), epoch 1, step 2: training diverged. Usual causes: --lr 1e\+30 "
     r"too high, --temperature 0.1 too low, broken images; nothing was saved", [],
     ["checkpoint.pth", "log.jsonl", "adam_resnet18_level0.pth"]),
    ("finetune-nan-init", finetune, lambda d: ["--task", "phantom-heart", "--data-root", str(d.phantom), "--arch",
                                               "resnet18", "--init", f"adam:{d.nan_run}", "--out", str(d.out)],
     r"--init: .*adam_resnet18_level2.pth: layer1.0.bn1.running_var holds NaN or infinite values", ["nan_run"],
     ["results.json"]),
    # finetune.py: flags, divergence, undefined metrics, results of another shape or run
    ("finetune-epochs-0", finetune, lambda d: FT + ["--data-root", str(d.phantom), "--epochs", "0", "--out", str(d.out)],
     r"argument --epochs: '0' is not an integer >= 1", [], [""]),
    ("finetune-device-cuda-without-gpu", finetune, lambda d: FT[:-2] + ["--device", "cuda", "--out", str(d.out)],
     r"argument --device: cuda: torch sees no CUDA GPU", [], [""]),
    ("finetune-device-tpu", finetune, lambda d: FT[:-2] + ["--device", "tpu", "--out", str(d.out)],
     r"argument --device: 'tpu': use auto, cpu, cuda or cuda:N", [], [""]),
    ("finetune-seed-2**70", finetune, lambda d: FT + ["--seed", HUGE_SEED, "--out", str(d.out)],
     r"argument --seed: .* is not an integer in \[0, 4294967295\]", [], [""]),
    ("finetune-batch-size-1", finetune, lambda d: FT + ["--batch-size", "1", "--out", str(d.out)],
     r"argument --batch-size: '1' is not an integer >= 2 \(BatchNorm", [], [""]),
    ("finetune-out-is-a-file", finetune, lambda d: FT + ["--out", str(d.file)],
     r"argument --out: .*a_file is a file, not a folder", ["file"], []),
    ("finetune-lr-1e30", finetune, lambda d: FT + ["--data-root", str(d.phantom), "--lr", "1e30", "--out", str(d.out)],
     r"\[1/1 random phantom-heart 3-shot seed 0\] .* is not finite in epoch 1, .*: training diverged \(usual causes: "
     r"--lr 1e\+30 too high, broken images\); no score is recorded for this run", [], ["results.json"]),
    ("finetune-auc-undefined-everywhere", finetune, lambda d: [
        "--task", "phantom-findings", "--data-root", str(d.nopos), "--arch", "resnet18", "--out", str(d.out)],
     r"--task phantom-findings: the ROC AUC is undefined for every label on the test split of .*nopos \(nodule: no "
     r"positive image in the test split; effusion: .*\): the test split needs positive and negative images", ["nopos"],
     ["results.json"]),
    ("finetune-results-of-another-shape", finetune, lambda d: FT + ["--data-root", str(d.phantom), "--out",
                                                                    str(d.json_shapes / "ft")],
     r"--out .*ft: .*results.json is not a finetune.py results file .*: move it away, or pick another --out",
     ["json_shapes"], []),
    ("finetune-rerun-other-data", finetune, lambda d: FT + ["--data-root", str(d.phantom), "--out",
                                                            str(d.ft_rerun / "data")],
     r"--data-root .*: .*phantom \(48 images, sha256 \w+\) is not the data of the phantom-heart runs in "
     r".*results.json \(/elsewhere/phantom, 99 images", ["ft_rerun"], []),
    ("finetune-rerun-other-settings", finetune, lambda d: FT + ["--data-root", str(d.phantom), "--out",
                                                                str(d.ft_rerun / "lr")],
     r"--lr 0.001: .*results.json holds phantom-heart runs with --lr 0.5, and one table mixes no settings: pass "
     r"--lr 0.5 to add runs to it", ["ft_rerun"], []),
    ("finetune-rerun-other-init", finetune, lambda d: FT + ["--data-root", str(d.phantom), "--init", "adam=random",
                                                            "--out", str(d.ft_rerun / "init")],
     r"--init adam=random: .*results.json holds phantom-heart runs of adam from adam:/some/run; give this starting "
     r"point another NAME=", ["ft_rerun"], []),
    ("finetune-pickle-init", finetune, lambda d: ["--task", "phantom-heart", "--data-root", str(d.phantom), "--arch",
                                                  "resnet18", "--init", f"moco:{d.evil / 'checkpoint.pth'}",
                                                  "--out", str(d.out)],
     r"--init: .* is not a plain-data checkpoint", ["evil"], ["marker", "results.json"]),
    ("eve-nan-init", eve, lambda d: ["--init", f"adam:{d.nan_run}", "--arch", "resnet18", "--img-size", "32",
                                     "--data-root", str(d.phantom), "--num-images", "4", "--what", "compositionality",
                                     "--out", str(d.out)],
     r"layer1.0.bn1.running_var holds NaN or infinite values", ["nan_run"], ["eve.json"]),
    # eve.py: flags, and an eve.json of another shape, data or settings
    ("eve-parts-9999", eve, lambda d: EVE[:-2] + ["--parts", "9999", "--out", str(d.out)],
     r"--parts: split counts must be in 2..64 \(an 8 px patch, the smallest drawn, has 64 pixels\), got \[9999\]",
     [], [""]),
    ("eve-context-0", eve, lambda d: EVE + ["--context", "0", "--out", str(d.out)],
     r"argument --context: '0' is not a number in \[1, 16\]", [], [""]),
    ("eve-device-cuda-without-gpu", eve, lambda d: EVE[:-2] + ["--device", "cuda", "--out", str(d.out)],
     r"argument --device: cuda: torch sees no CUDA GPU", [], [""]),
    ("eve-knn-k-0", eve, lambda d: EVE + ["--knn-k", "0", "--out", str(d.out)],
     r"argument --knn-k: '0' is not an integer >= 1", [], [""]),
    ("eve-knn-k-minus-1", eve, lambda d: EVE + ["--knn-k", "-1", "--out", str(d.out)],
     r"argument --knn-k: '-1' is not an integer >= 1", [], [""]),
    ("eve-patch-frac-0", eve, lambda d: EVE + ["--patch-frac", "0", "--out", str(d.out)],
     r"argument --patch-frac: '0' is not a number in \(0, 1\]", [], [""]),
    ("eve-what-comma", eve, lambda d: EVE + ["--what", ",", "--out", str(d.out)],
     r"--what ',': names nothing, choose from locality, compositionality, correspondence", [], [""]),
    ("eve-seed-2**70", eve, lambda d: EVE + ["--seed", HUGE_SEED, "--out", str(d.out)],
     r"argument --seed: .* is not an integer in \[0, 4294967295\]", [], [""]),
    ("eve-out-is-a-file", eve, lambda d: EVE + ["--out", str(d.file)],
     r"argument --out: .*a_file is a file, not a folder", ["file"], []),
    ("eve-grid-finer-than-pixels", eve, lambda d: EVE[:-6] + ["--what", "correspondence", "--grid", "100", "--dicom",
                                                              "none", "--data-root", str(d.phantom), "--out", str(d.out)],
     r"--grid 100: the 64x64 images cannot be cut into 100x100 cells of at least 1 px", [], ["eve.json"]),
    ("eve-landmarks-missing", eve, lambda d: EVE + ["--data-root", str(d.phantom), "--landmarks", str(d.base / "no.csv"),
                                                    "--out", str(d.out)],
     r"--landmarks .*no.csv: no such file", [], ["eve.json"]),
    ("eve-json-of-another-shape", eve, lambda d: EVE + ["--data-root", str(d.phantom), "--out",
                                                        str(d.json_shapes / "eve")],
     r"--out .*eve: .*eve.json is not an eve.py output", ["json_shapes"], []),
    ("eve-rerun-other-data", eve, lambda d: EVE + ["--data-root", str(d.phantom), "--out", str(d.eve_rerun / "data")],
     r"--data-root .*: .*phantom \(48 images, sha256 \w+\) is not the data of the measurements in .*eve.json",
     ["eve_rerun"], []),
    ("eve-rerun-other-settings", eve, lambda d: EVE + ["--data-root", str(d.phantom), "--out", str(d.eve_rerun / "img")],
     r"--img-size 16: .*eve.json holds measurements with --img-size 64: pass that to add encoders to it",
     ["eve_rerun"], []),
    # ablate.py
    ("ablate-out-is-a-file", ablate, lambda d: ["--out", str(d.file), "--scale", "smoke"],
     r"argument --out: .*a_file is a file, not a folder", ["file"], []),
    ("ablate-seeds-0", ablate, lambda d: ["--out", str(d.out), "--scale", "smoke", "--seeds", "0"],
     r"argument --seeds: '0' is not an integer >= 1", [], [""]),
    ("ablate-json-of-another-shape", ablate, lambda d: ["--out", str(d.json_shapes / "abl"), "--scale", "smoke",
                                                       "--data-root", str(d.phantom)],
     r"--out .*abl: .*ablation.json is not an ablate.py record", ["json_shapes"], []),
    ("ablate-rerun-other-data-root", ablate, lambda d: ["--out", str(d.abl_rerun), "--scale", "smoke", "--data-root",
                                                       str(d.phantom)],
     r"--data-root .*phantom: .*\(48 images, sha256 \w+\) is not the data of the ablation in .*abl_rerun "
     r"\(/elsewhere/phantom, 99 images", ["abl_rerun"], []),
    # data_prep: --force onto a folder that is not a cache, tables with other separators or columns, counts
    ("force-onto-a-non-cache", dp, lambda d: ["phantom", "--out", str(d.notcache), "--num-images", "4", "--size",
                                              "16", "--workers", "1", "--force"],
     r"notcache exists, is not empty and is not a cache \(no meta.json\): --force replaces caches only", ["notcache"],
     []),
    ("csv-semicolons", dp, lambda d: ["chestxray14", "--src", str(d.semicolon), "--out", str(d.out), "--size", "16",
                                      "--workers", "1"],
     r"Data_Entry_2017.csv: no column\(s\) \['Image Index', 'Finding Labels'\]; it is separated by ';'",
     ["semicolon"], [""]),
    ("csv-other-columns", dp, lambda d: ["chestxray14", "--src", str(d.nocols), "--out", str(d.out), "--size", "16",
                                         "--workers", "1"],
     r"no column\(s\) \['Image Index', 'Finding Labels'\]; its columns are \['Image', 'Labels'\]", [], [""]),
    ("data-prep-zero-images", dp, lambda d: ["phantom", "--out", str(d.out), "--num-images", "0"],
     r"--num-images 0: must be >= 1", [], [""]),
    ("data-prep-src-holds-a-cache", dp, lambda d: ["folder", "--src", str(d.holder), "--out", str(d.out),
                                                   "--workers", "1"],
     r"--src .*holder: .*holder/phantom inside it is a data_prep.py cache", ["holder"], [""]),
    # data_prep: malformed tables are refused at file:line, never read as labels
    ("csv-short-row", dp, lambda d: _csv(d, "short.csv", "--label-cols", "A,B"),
     r"tables/short.csv line 3: 2 field\(s\), the header has 3: a short row would read as blank cells", ["tables"],
     [""]),
    ("csv-long-row", dp, lambda d: _csv(d, "long.csv", "--label-cols", "A,B"),
     r"tables/long.csv line 3: 4 field\(s\), the header has 3: a value holding a comma must be quoted", ["tables"],
     [""]),
    ("csv-header-names-a-column-twice", dp, lambda d: _csv(d, "twice.csv", "--label-cols", "A,B"),
     r"tables/twice.csv: the header names 'A' 2 times \(columns 2, 4\)", ["tables"], [""]),
    ("cxr14-header-names-a-column-twice", dp, lambda d: ["chestxray14", "--src", str(d.tables), "--out", str(d.out),
                                                         "--size", "16", "--workers", "1"],
     r"Data_Entry_2017.csv: the header names 'Image Index' 2 times \(columns 1, 3\)", ["tables"], [""]),
    ("csv-not-utf8", dp, lambda d: _csv(d, "latin1.csv", "--label-cols", "A,B"),
     r"tables/latin1.csv line 3: byte 0xe9 is not UTF-8 text; save the file as UTF-8", ["tables"], [""]),
    # data_prep: images the reader cannot use, named
    ("image-1x1", dp, lambda d: ["folder", "--src", str(d.tiny_image), "--out", str(d.out), "--size", "16",
                                 "--workers", "1"],
     r"bad source image .*tiny_image/dot.png: ValueError: a 1x1 px image is too small to learn anatomy from",
     ["tiny_image"], [""]),
    ("file-name-not-utf8", dp, lambda d: ["folder", "--src", str(d.badname), "--out", str(d.out), "--size", "16",
                                          "--workers", "1"],
     r"bad source image .*badname/caf\\xe9.png: its name is not UTF-8 text", ["badname"], [""]),
    # data_prep: flags, checked when parsed
    ("val-fraction-1.5", dp, lambda d: ["folder", "--src", str(d.tables), "--out", str(d.out), "--val-fraction", "1.5"],
     r"--val-fraction 1.5: must be a fraction in \[0, 1\)", [], [""]),
    ("val-fraction-nan", dp, lambda d: _csv(d, "short.csv", "--label-cols", "A,B", "--val-fraction", "nan"),
     r"--val-fraction nan: must be a fraction in \[0, 1\)", [], [""]),
    ("fractions-leave-no-train", dp, lambda d: _csv(d, "short.csv", "--label-cols", "A", "--val-fraction", "0.5",
                                                    "--test-fraction", "0.5"),
     r"--val-fraction 0.5 and --test-fraction 0.5 leave no image for train", [], [""]),
    ("image-path-without-braces", dp, lambda d: _csv(d, "short.csv", "--label-cols", "A", "--image-path", "{name}"),
     r"argument --image-path: '\{name\}': expected a path with \{\} where the column's value goes", [], [""]),
    ("label-cols-empty", dp, lambda d: _csv(d, "short.csv", "--label-cols", ","),
     r"argument --label-cols: ',': no column names", [], [""]),
    ("label-cols-twice", dp, lambda d: _csv(d, "short.csv", "--label-cols", "A,A"),
     r"argument --label-cols: 'A,A': 'A' is given twice", [], [""]),
    ("keep-cols-shadows-index", dp, lambda d: _csv(d, "short.csv", "--label-cols", "A", "--keep-cols", "split"),
     r"--keep-cols split: index.csv has its own 'split' column", [], [""]),
    ("seed-negative", dp, lambda d: ["phantom", "--out", str(d.out), "--num-images", "2", "--seed", "-1"],
     r"--seed -1: must be >= 0", [], [""]),
    ("split-seed-negative", dp, lambda d: _csv(d, "short.csv", "--label-cols", "A", "--split-seed", "-1"),
     r"--split-seed -1: must be >= 0", [], [""]),
    ("workers-a-thousand", dp, lambda d: ["phantom", "--out", str(d.out), "--num-images", "2", "--workers", "1000"],
     r"--workers 1000: must be <= \d+ \(4 processes per core", [], [""]),
    ("masks-not-a-folder", dp, lambda d: ["jsrt", "--src", str(d.tables), "--masks", str(d.base / "SCR"), "--out",
                                          str(d.out)],
     r"--masks .*SCR is not a folder", [], [""]),
    ("out-is-a-file", dp, lambda d: ["phantom", "--out", str(d.tables / "short.csv"), "--num-images", "2", "--size",
                                     "16", "--workers", "1"],
     r"--out .*short.csv is a file, not a folder", ["tables"], []),
    ("speed-of-no-cache", dp, lambda d: ["speed", "--cache", str(d.base / "nowhere")],
     r"--cache .*nowhere: dataset cache .*nowhere does not exist", [], [""]),
    ("speed-n-0", dp, lambda d: ["speed", "--cache", str(d.phantom), "--n", "0"], r"--n 0: must be >= 1", [], []),
]


def snapshot(*paths):
    """{file: (size, mtime)} under the paths: the same before and after = nothing was written or replaced."""
    files = {}
    for root in map(Path, paths):
        for f in (sorted(root.rglob("*")) if root.is_dir() else [root]):
            if f.is_file():
                files[str(f)] = (f.stat().st_size, f.stat().st_mtime_ns)
    return files


def _where(d, name):
    return getattr(d, name) if name and hasattr(d, name) else d.out / name


def one_line(script, argv, capsys):
    """Run a script's main in-process as its command line would: (the line it ends with, all of stderr)."""
    try:
        script.main(argv)
    except SystemExit as e:                      # argparse, and data_prep's own one-line errors
        assert e.code not in (0, None)
        err = capsys.readouterr().err
        return [line for line in err.splitlines() if "error:" in line][-1].split("error: ", 1)[1], err
    except ONE_LINE.get(script, ()) as e:
        assert "\n" not in str(e).strip(), f"more than one line: {e}"
        return str(e), capsys.readouterr().err
    raise AssertionError(f"{script.__name__}.main({argv}) did not fail")


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_loses_nothing(row, d, capsys):
    name, script, argv, message, unchanged, absent = row
    if name.endswith("device-cuda-without-gpu") and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    if name == "file-name-not-utf8" and d.badname is None:
        pytest.skip("this file system takes UTF-8 file names only")
    d.out = d.base / "out" / name
    before = snapshot(*[_where(d, n) for n in unchanged])
    line, err = one_line(script, argv(d), capsys)
    assert re.search(message, line), line
    assert "Traceback" not in err and "weights_only=False" not in line
    assert snapshot(*[_where(d, n) for n in unchanged]) == before
    assert not [n for n in absent if _where(d, n).exists()]


@pytest.mark.parametrize("name", ["batch-size-0", "resume-arch", "data-holds-a-cache", "csv-semicolons",
                                  "finetune-nan-init", "finetune-epochs-0", "finetune-device-tpu", "eve-parts-9999",
                                  "eve-context-0", "ablate-out-is-a-file", "ablate-json-of-another-shape"])
@pytest.mark.slow
def test_the_command_line_prints_that_one_line(name, d):
    """The same tries as real commands: exit status 1 or 2, the line on stderr, no traceback."""
    _, script, argv, message, _, _ = next(r for r in ROWS if r[0] == name)
    d.out = d.base / "cli" / name
    done = subprocess.run([sys.executable, str(ROOT / f"{script.__name__}.py"), *argv(d)], capture_output=True,
                          text=True, timeout=300, cwd=d.base, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert re.search(message, done.stderr), done.stderr[-2000:]


# ---- divergence -----------------------------------------------------------------------------------------------

def _strict_json_lines(path):
    def refuse(token):
        raise ValueError(f"bare {token} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("steps,what", [(2, r"the loss is not finite in stage 2 \(level 2\), epoch 1, step 2"),
                                        (1, r"student\.\S+ is not finite in stage 2 \(level 2\), epoch 1, its end")])
@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_its_last_good_files(steps, what, d, tmp_path):
    """A good level-0 stage, then a level-2 stage with --lr 1e30 --wd 1e30: one step makes weights infinite. With
    several steps per epoch the next loss is NaN; with one, the loss was still finite and the weights are caught at
    the end of the epoch. Either way the run stops naming the place (the step counted within its epoch: the second
    step of stage 2, not the run's fourth) and the usual causes, the level-0 checkpoint and export stay as they
    were, and log.jsonl stays strict JSON."""
    out = tmp_path / "run"
    adam.main(d.tiny + ["--levels", "0", "--steps-per-epoch", str(steps), "--out", str(out)])
    before = snapshot(out / "checkpoint.pth", out / "adam_resnet18_level0.pth")
    with pytest.raises(runs.NonFinite, match=what + r": training diverged.* the last good checkpoint and exports in "
                                              r".* are kept: continue from them with `--resume .* --lr"):
        adam.main(["--resume", str(out), "--levels", "0,2", "--lr", "1e30", "--wd", "1e30"])
    assert snapshot(out / "checkpoint.pth", out / "adam_resnet18_level0.pth") == before
    assert runs.first_nonfinite(runs.load_checkpoint(out / "checkpoint.pth")) is None
    assert [(r["level"], r["epoch"]) for r in _strict_json_lines(out / "log.jsonl")] == [(0, 1)]


def test_the_log_is_strict_json_whatever_the_record_holds(tmp_path):
    runs.append_log(tmp_path / "log.jsonl", {"stage": 0, "epoch": 1, "loss": 1.5, "images_per_s": float("inf"),
                                             "monitor": {"std": float("nan"), "ok": [1.0, float("-inf")]}})
    (r,) = _strict_json_lines(tmp_path / "log.jsonl")
    assert r == {"stage": 0, "epoch": 1, "loss": 1.5, "images_per_s": None, "monitor": {"std": None, "ok": [1.0, None]}}


# ---- the run folder -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_overwrite_replaces_the_earlier_run_entirely(d, tmp_path):
    """--overwrite deletes the earlier run's files first: no export of a level the new run does not reach stays
    for `finetune --init adam:DIR` to pick, and the log holds the new run only."""
    out = tmp_path / "run"
    adam.main(d.tiny + ["--levels", "0,2", "--steps-per-epoch", "1", "--out", str(out)])
    adam.main(d.tiny + ["--levels", "0", "--steps-per-epoch", "1", "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.glob("adam_*.pth")) == ["adam_resnet18_level0.pth"]
    assert [(r["level"], r["epoch"]) for r in _strict_json_lines(out / "log.jsonl")] == [(0, 1)]
    assert runs.backbone_file(out, "resnet18")[0].name == "adam_resnet18_level0.pth"


@pytest.mark.slow
def test_a_kill_between_log_line_and_checkpoint_leaves_each_epoch_once(d, tmp_path, monkeypatch):
    out, real_save = tmp_path / "run", runs.save_checkpoint

    def die_before_the_second_checkpoint(path, **state):
        if state["epoch"] == 2:
            raise KeyboardInterrupt                # after epoch 2's log line, before its checkpoint
        real_save(path, **state)
    monkeypatch.setattr(runs, "save_checkpoint", die_before_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        adam.main(d.tiny + ["--levels", "0", "--epochs", "2", "--steps-per-epoch", "1", "--out", str(out)])
    assert [r["epoch"] for r in _strict_json_lines(out / "log.jsonl")] == [1, 2]
    monkeypatch.setattr(runs, "save_checkpoint", real_save)
    adam.main(["--resume", str(out)])                 # redoes epoch 2
    assert [r["epoch"] for r in _strict_json_lines(out / "log.jsonl")] == [1, 2]
    assert runs.load_checkpoint(out / "checkpoint.pth")["epoch"] == 2


@pytest.fixture
def holder(tmp_path):
    """Another process holding a FolderLock on a path, for as long as the test needs it."""
    procs = []

    def hold(path):
        code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import data_prep; "
                f"data_prep.FolderLock({str(path)!r}, 'busy'); print('locked', flush=True); time.sleep(120)")
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "locked"
        return p.pid
    yield hold
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_a_second_process_on_the_same_folder_is_refused_at_once(d, tmp_path, holder, capsys):
    out = tmp_path / "run"
    out.mkdir()
    pid = holder(out / ".lock")
    t = time.time()
    with pytest.raises(BlockingIOError, match=rf"--out {re.escape(str(out))} is in use by another adam.py run "
                                              rf"\(pid {pid}\): wait for it to end, or pick another --out"):
        adam.main(d.tiny + ["--out", str(out)])
    assert time.time() - t < 60 and not (out / "args.json").exists()
    cache = tmp_path / "cache"
    pid = holder(tmp_path / ".cache.lock")
    with pytest.raises(SystemExit):
        dp.main(["phantom", "--out", str(cache), "--num-images", "4", "--size", "16", "--workers", "1"])
    assert f"{cache} is being written by another data_prep.py (pid {pid})" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache.lock", "run"]


def test_temporary_names_are_unique_and_files_are_synced_before_the_rename(tmp_path, monkeypatch):
    """Two writers of one file never share a temporary name (here one writes while the other is half way), and the
    data reaches the disk before the rename publishes it."""
    target, seen = tmp_path / "checkpoint.pth", []

    def outer(p):
        Path(p).write_text("outer")
        seen.append(p)
        runs.write_atomic(target, lambda q: (seen.append(q), Path(q).write_text("inner")))
    runs.write_atomic(target, outer)
    assert seen[0] != seen[1] and target.read_text() == "outer" and not list(tmp_path.glob(".*"))
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    runs.write_atomic(target, lambda p: Path(p).write_text("x"))
    assert events[:2] == ["fsync", "replace"]


# ---- a full disk -----------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size, or None where this machine does not let us mount one."""
    mounted = []

    def mount(size):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if os.geteuid() != 0 or not shutil.which("mount"):
            return None
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if r.returncode:
            return None
        mounted.append(where)
        return where
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.slow
def test_data_prep_on_a_full_disk_says_so_and_leaves_nothing(small_disk, tmp_path, monkeypatch, capsys):
    """Before writing: the size is known, the free space checked. While writing (the disk filled meanwhile): the
    memory-mapped files are allocated first, so ENOSPC (not SIGBUS) arrives, as one line. Nothing stays behind."""
    disk = small_disk("1m")
    if disk is None:                                   # no tmpfs here: a disk that reports 100 kB free
        disk = tmp_path / "disk"
        disk.mkdir()
        monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=100_000))
    args = ["phantom", "--out", str(disk / "phantom"), "--num-images", "40", "--size", "64", "--workers", "1"]
    with pytest.raises(SystemExit):
        dp.main(args)
    err = capsys.readouterr().err
    assert re.search(r"error: disk full: writing .*phantom needs about 1.\d MiB and .* has \d+.\d MiB free; free space "
                     r"and run the same command again, or pick another --out or a smaller --size", err), err
    assert "Traceback" not in err and list(disk.iterdir()) == []
    monkeypatch.setattr(safe_files, "check_room", lambda *a: None)   # the check passed, then the disk filled up
    if not disk.is_mount():                            # no tmpfs: allocating the memory-mapped files finds no room
        def no_room(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "posix_fallocate", no_room, raising=False)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=0))
    with pytest.raises(SystemExit):
        dp.main(args)
    err = capsys.readouterr().err
    assert re.search(r"error: disk full while writing .*phantom: nothing was written; free space and run the same "
                     r"command again", err), err
    assert "Traceback" not in err and list(disk.iterdir()) == []


@pytest.mark.slow
def test_adam_on_a_full_disk_keeps_the_previous_checkpoint(d, small_disk, tmp_path, monkeypatch):
    """A 250 MB disk holds epoch 1's checkpoint (~140 MB) and the level-0 export, not a second checkpoint beside
    the first: the write fails as "disk full while writing OUT/checkpoint.pth", the epoch-1 checkpoint stays,
    no temporary file is left. Without a tmpfs: torch.save fails as it does on a full disk."""
    disk = small_disk("250m")
    if disk is None:
        disk, real_save = tmp_path / "disk", torch.save

        def full(obj, f, *a, **k):
            if Path(f).name.startswith(".checkpoint.pth.") and obj["epoch"] == 2:
                Path(f).write_bytes(b"PK partial")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            return real_save(obj, f, *a, **k)
        monkeypatch.setattr(torch, "save", full)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=0))
    out = disk / "run"
    with pytest.raises(dp.DiskFull, match=rf"disk full while writing {re.escape(str(out / 'checkpoint.pth'))}; the "
                                          rf"previous one is kept: free some space \(or pick another folder\), then "
                                          rf"continue it with `python adam.py --resume {re.escape(str(out))}`"):
        adam.main(d.tiny + ["--levels", "0", "--epochs", "2", "--steps-per-epoch", "1", "--out", str(out)])
    assert runs.load_checkpoint(out / "checkpoint.pth")["epoch"] == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# ---- one image reader ------------------------------------------------------------------------------------------

def test_one_reader_for_adam_data_prep_and_eve(tmp_path):
    """A 16-bit PNG reads the same in adam.py's folder source and in a data_prep cache (min-max scaled, not clipped
    to white), a JPEG with an EXIF rotation is turned upright in both, and eve.py reads through the same function."""
    src = tmp_path / "src"
    src.mkdir()
    a16 = np.random.default_rng(0).integers(1000, 40000, (32, 32)).astype(np.uint16)
    Image.fromarray(a16).save(src / "a16.png")
    rot = np.zeros((32, 16, 3), np.uint8)
    rot[:4] = 255                                       # a white band at the top of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6                                    # Orientation: rotate 90 degrees clockwise to view
    Image.fromarray(rot).save(src / "b_rot.jpg", exif=exif, quality=95)
    folder = dp.FolderImages(src)
    x16, xrot = folder[0][0], folder[1][0]
    a = a16.astype(np.int64)
    want = np.rint((a - a.min()) * 255 / (a.max() - a.min())).astype(np.uint8)
    np.testing.assert_array_equal(x16, want)
    assert xrot.shape == (16, 32) and xrot[:, -4:].mean() > 200 and xrot[:, :4].mean() < 50   # band now on the right
    dp.main(["folder", "--src", str(src), "--out", str(tmp_path / "c"), "--size", "32", "--workers", "1"])
    cache = dp.open_cache(tmp_path / "c")
    names = [r["name"] for r in cache.index]
    np.testing.assert_array_equal(cache.images[names.index("a16.png")], x16)
    up = np.asarray(dp.read_image(src / "b_rot.jpg", 1, 32, "pad")[0])
    np.testing.assert_array_equal(cache.images[names.index("b_rot.jpg")], up)
    np.testing.assert_array_equal(eve.read_dicom_grey(src / "a16.png", 32)[0], want / np.float32(255))


def test_fitting_a_long_strip_allocates_about_its_output(tmp_path):
    """A 100000 x 8 px image fitted to 512 px with --fit pad, grey and RGB: resized first, then padded, so reading it
    needs about the decoded image plus a few outputs. Padding first would build a 100000^2 px canvas (9.3 GiB).
    Measured as memory, not time: the reader runs in a child process whose address space may grow by only
    `budget` (the decoded image + 8 outputs + 16 MiB for the decoder's buffers), so a bigger allocation fails
    there with MemoryError; 4-8 MiB were needed where this was written."""
    code = ("import resource, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import numpy as np\n"
            "from adam_cxr.decode import read_image\n"
            "path, channels, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
            "vm = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + budget, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
            "a = np.asarray(read_image(path, channels, 512, 'pad')[0])\n"
            "print(a.shape, np.flatnonzero(a.reshape(512, -1).any(1)).tolist())\n")
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc here to read the address space from")
    strip = np.random.default_rng(0).integers(1, 256, (8, 100_000), dtype=np.uint8)
    Image.fromarray(strip).save(tmp_path / "wide.png")
    Image.fromarray(np.ascontiguousarray(strip.T)).save(tmp_path / "tall.png")
    for name, channels in (("wide", 1), ("tall", 3)):
        budget = strip.size * channels + 8 * 512 * 512 * channels + 16 * 2 ** 20
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{name}.png"), str(channels), str(budget)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-500:]
        shape, rows = done.stdout.split(") ")
        assert shape == f"({', '.join(['512', '512'] + ['3'] * (channels == 3))}"
        # the strip keeps its aspect: one row of 512 px (wide), a column of 512 rows (tall)
        assert rows.strip() == ("[255]" if name == "wide" else str(list(range(512))))


def test_a_nearly_uniform_16_bit_image_is_named_in_a_warning(tmp_path, capsys):
    """Min-max scaling maps a constant 16-bit image, or a near-constant one with a hot pixel, to black: the
    conversion keeps it but names the file in a WARNING line and in report.json; a normal 16-bit image is not
    named."""
    src = tmp_path / "src"
    src.mkdir()
    hot = np.full((32, 32), 1000, np.uint16)
    hot[8:24, 8:24], hot[0, 0] = 1100, 65535                    # the anatomy in 100 levels, one hot pixel
    Image.fromarray(hot).save(src / "hot_pixel.png")
    Image.fromarray(np.full((32, 32), 1000, np.uint16)).save(src / "blank.png")
    Image.fromarray(np.random.default_rng(0).integers(1000, 40000, (32, 32)).astype(np.uint16)).save(src / "ok.png")
    dp.main(["folder", "--src", str(src), "--out", str(tmp_path / "c"), "--size", "16", "--workers", "1"])
    err = capsys.readouterr().err
    for name in ("hot_pixel.png", "blank.png"):
        assert re.search(rf"WARNING: .*src/{name}: I;16 values .*, but 98 % of the pixels fall within 1 grey level",
                         err), err
    assert "ok.png" not in err
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert sorted(Path(x["file"]).name for x in report["nearly_uniform"]) == ["blank.png", "hot_pixel.png"]
    cache = dp.open_cache(tmp_path / "c")
    assert len(cache) == 3 and cache.images[1].mean() < 2                       # hot_pixel.png: black, as warned


# ---- the pruner's count at level 0 ------------------------------------------------------------------------------

@pytest.mark.slow
def test_level_0_runs_without_the_pruner_and_counts_nothing_pruned(tiny_adam_run):
    """adam.py passes threshold None at level 0 (the authors prune only at levels > 0), and the fused op counts only
    real pruning (tests/test_fused_op.py: a NaN bank row is not 'pruned'), so the log says 0 there."""
    log = _strict_json_lines(tiny_adam_run / "log.jsonl")
    assert [(r["level"], r["pruned"]) for r in log if r["level"] == 0] == [(0, 0.0)]


# ---- caches, swaps, lists ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_force_rebuild_killed_between_its_renames_loses_nothing(tmp_path):
    out = tmp_path / "phantom"
    dp.main(["phantom", "--out", str(out), "--num-images", "6", "--size", "16", "--workers", "1"])
    first = np.array(dp.open_cache(out).images)
    code = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r}); import data_prep as dp\n"
            f"real, calls = os.rename, []\n"
            f"def rename(a, b):\n"
            f"    calls.append(a)\n"
            f"    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)   # between the swap's two renames\n"
            f"    real(a, b)\n"
            f"os.rename = rename\n"
            f"dp.main(['phantom', '--out', {str(out)!r}, '--num-images', '6', '--size', '16', '--workers', '1', "
            f"'--seed', '3', '--force'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not out.exists()                             # the old cache sits in .phantom.old-<pid>
    np.testing.assert_array_equal(dp.open_images(str(out)).images, first)   # put back when next opened
    assert not [p.name for p in tmp_path.iterdir() if dp.TMP_FOLDER.fullmatch(p.name)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_data_prep_stopped_by_a_signal_says_so_in_one_line_and_leaves_nothing(tmp_path, sig):
    """Ctrl-C (SIGINT to the whole process group, decoding workers included) or `kill` during a conversion: one
    line, exit status 128 + the signal, and no temporary folder, lock or output left."""
    out = tmp_path / "sub" / "phantom"
    cmd = [sys.executable, str(ROOT / "data_prep.py"), "phantom", "--out", str(out), "--num-images", "20000",
           "--size", "32", "--workers", "2"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), os.setpgrp()))
    err = ""
    while "phantom:" not in err:                     # the progress bar: the pool is making images
        err += p.stderr.read(1)
        assert err or p.poll() is None, "data_prep.py ended before it started"
    os.killpg(p.pid, sig)
    err += p.communicate(timeout=120)[1]
    assert p.returncode == 128 + sig, err
    assert err.rstrip().splitlines()[-1] == (f"error: stopped by {signal.Signals(sig).name}: nothing was written "
                                             f"(the temporary folder is removed); run the same command again")
    assert "Traceback" not in err and list((tmp_path / "sub").iterdir()) == []


@pytest.mark.slow
def test_duplicate_rows_and_list_entries_are_reported_and_warned(tmp_path, capsys):
    src = tmp_path / "src"
    fake = make_cxr14(src, "flat")
    entry = src / "Data_Entry_2017.csv"
    lines = entry.read_text().splitlines()
    entry.write_text("\n".join(lines + [lines[3]]) + "\n")                  # an identical repeated row
    tv = src / "train_val_list.txt"
    first = tv.read_text().split()[0]
    tv.write_text(tv.read_text() + first + "\n")                             # a name listed twice
    out = tmp_path / "cxr"
    dp.main(["chestxray14", "--src", str(src), "--out", str(out), "--size", "16", "--skip-bad", "--workers", "1"])
    report = json.loads((out / "report.json").read_text())
    assert report["duplicate_rows"] == [f"Data_Entry_2017.csv line {len(lines) + 1}: {lines[3].split(',')[0]}"]
    assert report["duplicate_list_entries"] == [f"train_val_list.txt: {first}"]
    err = capsys.readouterr().err
    assert "WARNING: 1 duplicate rows" in err and "WARNING: 1 duplicate list entries" in err
    assert len(dp.open_cache(out)) == report["converted"] <= len(fake["recs"])
    row = lines[3].split(",")
    row[1] = "Hernia" if row[1] != "Hernia" else "Mass"                  # a repeat that contradicts its first row
    entry.write_text("\n".join(lines + [",".join(row)]) + "\n")
    with pytest.raises(SystemExit):
        dp.main(["chestxray14", "--src", str(src), "--out", str(tmp_path / "cxr2"), "--size", "16", "--workers", "1"])
    assert re.search(rf"line {len(lines) + 1}: {re.escape(row[0])} repeats line 4 with other labels",
                     capsys.readouterr().err)


def test_data_prep_syncs_every_file_before_the_cache_appears(tmp_path, monkeypatch):
    events, real_fsync, real_rename = [], safe_files.fsync, os.rename
    monkeypatch.setattr(safe_files, "fsync", lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", Path(b).name)), real_rename(a, b))[1])
    out = tmp_path / "phantom"
    dp.main(["phantom", "--out", str(out), "--num-images", "4", "--size", "16", "--workers", "1"])
    synced = {name for kind, name in events[:events.index(("rename", "phantom"))] if kind == "fsync"}
    assert {p.name for p in out.rglob("*")} - {"meta.json"} <= synced and "meta.json.tmp" in synced


# ---- the data a run was made on ----------------------------------------------------------------------------------

def test_a_resume_from_another_folder_with_a_relative_data_is_refused(phantom_root, tmp_path, monkeypatch):
    """`--data mydata` is relative: resumed from another working directory it names other data (there: 40 images,
    not 48). The identity saved with the run (path, image count, meta.json's hash) refuses it, naming --data, before
    anything is written; from the run's own folder the same command continues it."""
    a, b, run = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    shutil.copytree(phantom_root, a / "mydata")
    dp.ensure_phantom(b / "mydata", num_images=40, size=64, seed=1)
    argv = [x if x != "phantom" else "mydata" for x in TINY_RUN] + ["--levels", "0", "--steps-per-epoch", "1",
                                                                   "--out", str(run)]
    monkeypatch.chdir(a)
    adam.main(argv)
    assert json.loads((run / "args.json").read_text())["data"] == runs.data_identity(a / "mydata")
    monkeypatch.chdir(b)
    before = snapshot(run)
    with pytest.raises(ValueError, match=rf"--data mydata: {re.escape(str(b / 'mydata'))} \(40 images, sha256 \w+\) "
                                         rf"is not the data of the run in {re.escape(str(run))} "
                                         rf"\({re.escape(str(a / 'mydata'))}, 48 images"):
        adam.main(["--resume", str(run), "--epochs", "2"])
    assert snapshot(run) == before
    monkeypatch.chdir(a)
    adam.main(["--resume", str(run), "--epochs", "2"])
    assert runs.load_checkpoint(run / "checkpoint.pth")["epoch"] == 2


def test_a_bank_far_larger_than_the_train_split_is_warned(d, tmp_path, capsys):
    """K far above the number of train images: the bank holds many earlier keys of each anchor's own image, which
    the loss contrasts as negatives. Allowed (a demo may want it), said at start with the flag."""
    adam.main(d.tiny + ["--queue-size", "1000", "--levels", "0", "--steps-per-epoch", "1", "--val-steps", "0",
                        "--out", str(tmp_path / "run")])
    assert re.search(r"WARNING: --queue-size 1000 is \d+x the \d+ train images: the bank holds many earlier keys of "
                     r"each anchor's own image, contrasted as negatives", capsys.readouterr().out)


# ---- signals ---------------------------------------------------------------------------------------------------

@pytest.fixture
def own_signals():
    """runs.command_line installs a SIGTERM handler (and ignores SIGINT once interrupted): put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_a_signal_while_the_checkpoint_is_written_leaves_no_temporary_file(d, tmp_path, monkeypatch, capsys,
                                                                           own_signals):
    """SIGTERM while epoch 2's checkpoint sits complete under its hidden temporary name, not yet renamed: the run
    ends in one line saying how to go on, the temporary file is removed, epoch 1's checkpoint stays and resumes."""
    out, real_save = tmp_path / "run", torch.save

    def save_then_terminated(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if Path(f).name.startswith(".checkpoint.pth.") and obj["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(torch, "save", save_then_terminated)
    argv = d.tiny + ["--levels", "0", "--epochs", "3", "--steps-per-epoch", "1", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        runs.command_line("adam.py", lambda: adam.main(argv), ONE_LINE[adam], note=lambda: runs.again(out))
    assert e.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.endswith(f"\nadam.py: interrupted by SIGTERM; continue it with `python adam.py --resume {out}`\n")
    assert "Traceback" not in err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert runs.load_checkpoint(out / "checkpoint.pth")["epoch"] == 1
    monkeypatch.setattr(torch, "save", real_save)
    adam.main(["--resume", str(out)])
    assert [r["epoch"] for r in _strict_json_lines(out / "log.jsonl")] == [1, 2, 3]


def _start(script, argv, cwd):
    # SIGINT back to its default in the child: a suite started in the background (CI runners, `cmd &`) inherits it
    # ignored, and Python then installs no Ctrl-C handler at all
    return subprocess.Popen([sys.executable, str(ROOT / f"{script}.py"), *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_signal_during_training_is_one_line_and_the_run_resumes(sig, group, d, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, DataLoader workers included) or `kill` (SIGTERM to adam.py) while
    it trains: one line, no traceback, exit status 128 + the signal, no temporary file and no lock left in OUT, and
    `--resume OUT`, which the line names, continues the run."""
    out = tmp_path / "run"
    p = _start("adam", d.tiny + ["--levels", "0", "--epochs", "100", "--steps-per-epoch", "1", "--workers", "1",
                                 "--val-steps", "0", "--out", str(out)], tmp_path)
    deadline = time.time() + 240
    while not (out / "checkpoint.pth").exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(1.0)                                     # well inside a later epoch, or writing its checkpoint
    os.killpg(p.pid, sig) if group else p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"adam.py: interrupted by {sig.name}; continue it with `python adam.py " \
                                           f"--resume {out}`", err[-3000:]
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")]
    epoch = runs.load_checkpoint(out / "checkpoint.pth")["epoch"]
    adam.main(["--resume", str(out), "--epochs", str(epoch + 1)])
    assert [r["epoch"] for r in _strict_json_lines(out / "log.jsonl")] == list(range(1, epoch + 2))


def test_a_signal_during_a_fine_tune_is_one_line_and_keeps_the_finished_runs(d, tmp_path):
    """SIGTERM in the middle of a fine-tune: one line naming what is kept; results.json (one finished run of the
    same settings) untouched, no lock left."""
    out = tmp_path / "ft"
    argv = FT + ["--data-root", str(d.phantom), "--epochs", "500", "--out", str(out)]
    config = finetune._config(finetune.get_args(argv))
    out.mkdir()
    (out / "results.json").write_text(json.dumps([dict(task="phantom-heart", init="random", init_spec="random",
                                                       shots=3, seed=9, metric="dice", value=50.0, **config,
                                                       data=runs.data_identity(d.phantom))]))
    before = snapshot(out)
    p = _start("finetune", argv, tmp_path)
    for _ in range(50):
        line = p.stdout.readline()
        if not line or "epoch 1/500" in line:
            break
    assert "epoch 1/500" in line, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"finetune.py: interrupted by SIGTERM; the finished runs are in "
                                            f"{out / 'results.json'}; the same command goes on with the rest")
    assert snapshot(out) == before and not (out / ".lock").exists()


# ---- the output folders of finetune.py, eve.py and ablate.py ---------------------------------------------------

@pytest.mark.parametrize("script,argv", [(finetune, FT), (eve, EVE), (ablate, ["--scale", "smoke"])],
                         ids=["finetune", "eve", "ablate"])
def test_a_second_process_on_a_scripts_folder_is_refused_at_once(script, argv, d, tmp_path, holder):
    out = tmp_path / "out"
    out.mkdir()
    pid = holder(out / ".lock")
    name = script.__name__
    with pytest.raises(BlockingIOError, match=rf"--out {re.escape(str(out))} is in use by another {name}.py run "
                                              rf"\(pid {pid}\): wait for it to end, or pick another --out"):
        script.main(argv + ["--data-root", str(d.phantom), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_finetune_runs_into_one_folder_add_up_with_their_identity(d, tmp_path):
    """Two runs into one --out (other starting points, other seeds): both kept in results.json and the table, each
    record with its settings and its data's identity."""
    out = tmp_path / "ft"
    argv = FT + ["--data-root", str(d.phantom), "--out", str(out)]
    finetune.main(argv + ["--init", "a=random"])
    finetune.main(argv + ["--init", "b=random", "--seed", "1"])
    records = json.loads((out / "results.json").read_text())
    assert sorted((r["init"], r["seed"]) for r in records) == [("a", 0), ("b", 1)]
    assert all(r["data"] == runs.data_identity(d.phantom) and r["lr"] == 1e-3 and r["img_size"] == 32
               for r in records)
    assert "| a |" in (out / "results.md").read_text() and "| b |" in (out / "results.md").read_text()


def test_eve_runs_into_one_folder_add_up_and_keep_their_figures(d, tmp_path):
    """Two runs into one --out: eve.json holds both encoders, with their settings and data; the first run's figure
    is kept (the second's gets a name of its own); an encoder NAME measured from another SPEC is refused."""
    out = tmp_path / "eve"
    argv = EVE + ["--data-root", str(d.phantom), "--out", str(out)]
    first = eve.main(argv + ["--init", "r1=random"])
    figure = Path(first["figures"]["compositionality"])
    drawn = figure.read_bytes()
    second = eve.main(argv + ["--init", "r2=random"])
    saved = json.loads((out / "eve.json").read_text())
    assert set(saved["results"]) == {"r1", "r2"} and saved["results"]["r1"]["init"] == "random"
    assert saved["results"]["r1"]["compositionality"] == json.loads(json.dumps(first["results"]["r1"]))[
        "compositionality"]
    assert saved["results"]["r2"]["data"] == runs.data_identity(d.phantom)
    assert figure.read_bytes() == drawn and Path(second["figures"]["compositionality"]) != figure
    assert set(saved["figures"].values()) == {str(figure), second["figures"]["compositionality"]}
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"--init r1=adam:.*: .*eve.json holds r1 measured from random; give this "
                                         r"encoder another NAME="):
        eve.main(argv + ["--init", f"r1=adam:{d.run}"])
    assert snapshot(out) == before
