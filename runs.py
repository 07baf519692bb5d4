"""The run folder of adam.py: what a pretraining run writes, and how it resumes. Bookkeeping beside the
method (adam.py), and the one home of the atomic writer and the checkpoint reader that finetune.py, eve.py
and bench.py use too.

    OUT/args.json                  every setting, versions, commit and command, at every start
    OUT/log.jsonl                  one line per epoch (stage, level, epoch, step, loss, lr, pruned, val_loss, ...)
    OUT/checkpoint.pth             student, teacher, bank, optimiser, RNG (CPU, and CUDA when in use): what --resume
                                   continues from
    OUT/adam_<arch>_level<n>.pth   the backbone at the end of each stage, torchvision keys
    OUT/adam_<arch>_level<n>_best.pth  the backbone of the stage's epoch with the lowest validation loss (the encoder
                                   the authors fine-tune, docs/METHOD.md §5); its epoch is best_epoch in log.jsonl
    OUT/curves.png                 loss, lr, pruning, similarities, alignment/uniformity (monitor.py), per stage end
    OUT/tb/                        TensorBoard scalars (--tensorboard)
"""
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import monitor  # curves.png, and the monitor's fields among the TensorBoard scalars


def write_atomic(path, write):
    """write(tmp path), then rename it onto path (made with its folder): a reader or a crash sees the old file or
    the new one, never half of one. The writer of every checkpoint, result and figure. Returns str(path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(path)


def load_checkpoint(path, flag="--resume"):
    """torch.load(weights_only=True): a checkpoint is data, not code. The one checkpoint reader (adam.py
    --resume, finetune.py and eve.py --init); errors name the flag and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary objects; say which file
        raise ValueError(f"{flag}: could not load {path} with torch.load(weights_only=True): {e}") from e


def save_checkpoint(path, **state):
    write_atomic(path, lambda p: torch.save(state, p))


def export_backbone(student, path):
    """The backbone alone, torchvision keys: torchvision.models.<arch>() loads it with only fc.* missing."""
    state = {k: v.contiguous() for k, v in student.backbone.state_dict().items()}
    return write_atomic(path, lambda p: torch.save(state, p))


def backbone_name(arch, level, best=False):
    return f"adam_{arch}_level{level}{'_best' if best else ''}.pth"


def backbone_file(run, arch, which="best"):
    """The backbone finetune.py and eve.py take from a run folder (`--init adam:RUN`, `adam:RUN@last`): the last
    level's export with the lowest validation loss (which="best", the authors' choice), or its last epoch
    ("last"); the last epoch too when there is no best (validation off); checkpoint.pth's student when nothing was
    exported. Returns (path, what it is in words)."""
    run, found = Path(run), {}
    for p in run.glob(f"adam_{arch}_level*.pth"):
        m = re.fullmatch(rf"adam_{re.escape(arch)}_level(\d+)(_best)?\.pth", p.name)
        if m:
            found[int(m.group(1)), bool(m.group(2))] = p
    levels = [level for level, best in found if not best or which == "best"]
    if levels:
        level = max(levels)
        if which == "best" and (level, True) in found:
            epochs = [r.get("best_epoch") for r in read_log(run) if r.get("level") == level and r.get("best_epoch")]
            at = f", epoch {epochs[-1]} of log.jsonl" if epochs else ""
            return found[level, True], f"level {level}, the epoch with the lowest validation loss{at}"
        if (level, False) in found:
            why = "" if which == "last" else f" (no {backbone_name(arch, level, True)}: validation was off)"
            return found[level, False], f"level {level}, last epoch{why}"
    if (run / "checkpoint.pth").is_file():
        return run / "checkpoint.pth", "the student of the last checkpoint (no exported backbone)"
    others = sorted(p.name for p in run.glob("adam_*_level*.pth"))
    hint = f" (found {others}: pass the matching --arch)" if others else ""
    raise FileNotFoundError(f"no adam_{arch}_level<n>.pth or checkpoint.pth in run folder {run}{hint}")


def read_log(run):
    """OUT/log.jsonl as a list of records ([] when missing)."""
    path = Path(run) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def resume(args, student, teacher, bank, say):
    """--resume: the last checkpoint's student, teacher, bank and RNG state -> (stage, epoch, step, checkpoint)
    to continue from; (0, 0, 0, None) for a fresh run. The optimiser state is restored by its stage."""
    if not args.resume:
        return 0, 0, 0, None
    ckpt = load_checkpoint(Path(args.resume) / "checkpoint.pth")
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    bank.queue.copy_(ckpt["bank"])
    bank.ptr = ckpt["bank_ptr"]
    stage, epoch = ckpt["stage"], ckpt["epoch"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"].get("cuda") and torch.cuda.is_available():  # a GPU run continues its CUDA random streams too
        for i, state in enumerate(ckpt["rng"]["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    if epoch == args.epochs:                                       # that stage had finished
        stage, epoch = stage + 1, 0
    say(f"resuming {args.resume}: stage {stage + 1}, epoch {epoch + 1}, step {ckpt['step']}")
    return stage, epoch, ckpt["step"], ckpt


class RunFolder:
    """Rank 0's writer of OUT (other ranks get one that writes nothing): args.json when the run starts,
    TensorBoard scalars per step, and after each epoch the log line, the stage's backbones and the checkpoint.
    ckpt: the checkpoint a resumed run continues from (it carries the stage's best validation loss so far)."""

    def __init__(self, args, fused, active=True, ckpt=None):
        self.args, self.out, self.active = args, Path(args.out), active
        self.tb, self.best = None, (ckpt or {}).get("best")  # best: {stage, level, epoch, val_loss} or None
        if active:
            write_args_json(self.out, args, fused)
            self.tb = tensorboard_writer(args, self.out)

    def step(self, step, **scalars):
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, step)

    def end_of_epoch(self, record, student, teacher, bank, optimizer, summary):
        if not self.active:
            return
        args, out = self.args, self.out
        out.mkdir(parents=True, exist_ok=True)
        best = self.best if self.best and self.best["stage"] == record["stage"] else None
        val = record.get("val_loss")
        improved = val is not None and math.isfinite(val) and (best is None or val < best["val_loss"])
        if improved:
            best = self.best = {k: record[k] for k in ("stage", "level", "epoch")} | {"val_loss": val}
        record["best_epoch"] = best["epoch"] if best else None  # the stage's lowest validation loss so far
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if improved:
            summary.setdefault("best", {})[record["level"]] = export_backbone(
                student, out / backbone_name(args.arch, record["level"], best=True))
        if record["epoch"] == args.epochs:                         # end of stage: export the backbone
            summary["backbones"].append(export_backbone(student, out / backbone_name(args.arch, record["level"])))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        save_checkpoint(out / "checkpoint.pth", args=dict(vars(args)), arch=args.arch, level=record["level"],
                        stage=record["stage"], epoch=record["epoch"], step=record["step"],
                        student=student.state_dict(), teacher=teacher.state_dict(), bank=bank.queue.cpu(),
                        bank_ptr=bank.ptr, optimizer=optimizer.state_dict(), rng=rng, best=best)
        if record["epoch"] == args.epochs:                         # end of a stage, and of the run after the last
            monitor.write_curves(out, args.threshold)
        if self.tb:
            for key in ("loss", "lr", "pruned", "images_per_s", "val_loss") + monitor.FIELDS:
                if record.get(key) is not None:
                    self.tb.add_scalar(f"epoch/{key}", record[key], record["step"])
            self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()


def write_args_json(out, args, fused):
    """OUT/args.json when a run starts: every setting, the versions of python, torch, torchvision, CUDA and the op,
    the loss path, the git commit of this file's checkout (null outside one) and the command line. A resumed run
    keeps the earlier starts under "previous_starts"."""
    def git(*cmd):
        try:
            r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *cmd], capture_output=True,
                               text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        import adam_ext
        op = adam_ext.build_info()
    except ImportError as e:
        op = f"not importable ({e})"
    path, previous = Path(out) / "args.json", []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            previous = old.pop("previous_starts", []) + [old]
        except ValueError:
            pass                                                   # unreadable: replaced
    commit = git("rev-parse", "HEAD")
    import numpy
    import torchvision

    info = {"args": dict(vars(args)), "loss": "fused adam_ext op" if fused else "pure-PyTorch reference",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": numpy.__version__, "adam_ext": op,
                         "cuda": torch.version.cuda},
            "commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "previous_starts": previous}
    return write_atomic(path, lambda p: Path(p).write_text(json.dumps(info, indent=1, default=str)))


def tensorboard_writer(args, out):
    """--tensorboard: a SummaryWriter on OUT/tb, or None without the flag. TensorBoard is never required; asking
    for it without the package is one clear error at start, not a run without curves."""
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError(f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard, "
                         f"or run without --tensorboard (log.jsonl has the same numbers)") from None
    return SummaryWriter(log_dir=str(Path(out) / "tb"))
