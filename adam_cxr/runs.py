"""The run folder of adam.py: what a pretraining run writes, how it resumes, and what it refuses. Bookkeeping beside
the method (adam.py), and the one home of the checkpoint reader that finetune.py, eve.py
and bench.py use too; the atomic writer, write_atomic, comes from adam_cxr/safe_files.py.

    OUT/args.json                  every setting, versions, commit and command, at every start
    OUT/log.jsonl                  one line per epoch (stage, level, epoch, step, loss, lr, pruned, val_loss, ...)
    OUT/checkpoint.pth             student, teacher, bank, optimiser, RNG (CPU, and CUDA when in use): what --resume
                                   continues from
    OUT/adam_<arch>_level<n>.pth   the backbone at the end of each stage, torchvision keys
    OUT/adam_<arch>_level<n>_best.pth  the backbone of the stage's epoch with the lowest validation loss (the encoder
                                   the authors fine-tune, docs/METHOD.md §5); its epoch is best_epoch in log.jsonl
    OUT/curves.png                 loss, lr, pruning, similarities, alignment/uniformity (monitor.py), per stage end
    OUT/tb/                        TensorBoard scalars (--tensorboard)
    OUT/.lock                      held while a run writes OUT: a second run into OUT is refused at once
    (args.json and the checkpoint also hold the identity of the training data, data_identity: a resume on other
    data is refused)

Nothing lost, nothing silently wrong: each file is written under a unique temporary name, fsynced and renamed into
place (a full disk: "disk full while writing FILE", the previous file kept); an OUT that holds another run is
refused unless the run continues it (--resume) or replaces it (--overwrite); a NaN or infinite loss or weight
stops the run before it writes anything, naming where; a checkpoint with pickled code or non-finite tensors is
refused by name; SIGINT and SIGTERM end a run in one line, its temporary files removed, resumable (command_line).
adam.py's flags are checked when parsed (the argparse types at the end) and, on --resume, against the saved run
(check_resume) and its data (check_data). finetune.py, eve.py and ablate.py lock their folders, identify their data
and end on an error or a signal with the same pieces.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from adam_cxr import monitor  # curves.png, and the monitor's fields among the TensorBoard scalars
from adam_cxr.safe_files import DiskFull, FolderLock, disk_full_error, write_atomic  # shared with the caches


def write_json(path, obj):
    """obj as strict JSON, atomically: a NaN or infinite number is written as null, never as a bare NaN that other
    JSON readers refuse (an undefined value is null, with its reason beside it where the writer knows one)."""
    text = json.dumps(json_safe(obj), indent=1, allow_nan=False, default=str)
    return write_atomic(path, lambda p: Path(p).write_text(text))


def read_json(path, flag, shape, check):
    """A JSON output this project wrote earlier into --out (results.json, eve.json, ablation.json), or None when
    missing. One that does not parse, or fails check(obj), is refused naming the file and `shape` (what it should
    hold), never overwritten: ValueError with the flag."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
        ok = check(obj)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        ok = False
    if not ok:
        raise ValueError(f"{flag} {path.parent}: {path} is not {shape}; it is left as it is: move it away, or pick "
                         f"another {flag}")
    return obj


def load_checkpoint(path, flag="--resume", keys=()):
    """torch.load(weights_only=True): a checkpoint is data, not code. The one checkpoint reader (adam.py --resume,
    finetune.py and eve.py --init). Refused with the flag and the file: a file holding pickled Python objects (never
    run), an unreadable one, one without `keys`, one with a NaN or infinite tensor (named)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met a Python object: refused before anything ran
        named = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{flag}: {path} is not a plain-data checkpoint: it holds "
                         f"{'the Python object ' + named.group(1) if named else 'pickled Python objects'}, which "
                         f"loading would run as code, so torch.load(weights_only=True) refused it. Pass a file of "
                         f"tensors only (what torch.save(model.state_dict(), FILE) writes)") from None
    except Exception as e:
        raise ValueError(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}); is the file complete?") from None
    lacking = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if lacking:
        raise ValueError(f"{flag}: {path} is not an adam.py checkpoint (no {', '.join(lacking)})")
    bad = first_nonfinite(obj)
    if bad:
        raise ValueError(f"{flag}: {path}: {bad} holds NaN or infinite values (the run that wrote it diverged); use "
                         f"a checkpoint from before, or train again with a lower --lr")
    return obj


def first_nonfinite(obj, name=""):
    """The dotted name of the first floating-point tensor in obj (nested dicts, lists, tuples) with a NaN or an
    infinite value, or None."""
    if torch.is_tensor(obj):
        return (name or "a tensor") if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        bad = first_nonfinite(value, f"{name}.{key}" if name else str(key))
        if bad:
            return bad
    return None


class NonFinite(ValueError):
    """Training diverged: a loss or a weight became NaN or infinite."""


def diverged(what, stage, level, epoch, step, args):
    """The error that stops a diverged run: where (step: the step within the epoch, counted from 1; None = at the
    end of the epoch), the usual causes, and what was kept."""
    out = Path(args.out)
    kept = (f"the last good checkpoint and exports in {out} are kept: continue from them with `--resume {out} --lr "
            f"{args.lr / 10:g}`" if (out / "checkpoint.pth").exists() else f"nothing was saved in {out}")
    at = f"step {step}" if step else "its end"
    return NonFinite(f"{what} is not finite in stage {stage + 1} (level {level}), epoch {epoch}, {at}: training "
                     f"diverged. Usual causes: --lr {args.lr:g} too high, --temperature {args.temperature:g} too low, "
                     f"broken images; {kept}")


def check_finite(record, args, **state):
    """Stop a diverged run at the end of an epoch, before anything is written: the epoch's training loss, then every
    tensor of `state` (student, teacher, bank: a weight can break in the epoch's last step), named. A non-finite
    validation loss alone does not stop it: it is logged as null and never taken as the best epoch."""
    bad = ("the epoch's loss" if not math.isfinite(record["loss"]) else None) or first_nonfinite(state)
    if bad:
        raise diverged(bad, record["stage"], record["level"], record["epoch"], None, args)


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


def epoch_records(run):
    """read_log(run) in step order, one record per (stage, epoch): a repeated epoch (a resume after a stop between
    the log line and the checkpoint) keeps its last line."""
    last = {(r["stage"], r["epoch"]): r for r in read_log(run)}
    return sorted(last.values(), key=lambda r: r["step"])


def write_curves(run, threshold):
    """run/curves.png from run/log.jsonl (the monitor's figure); None when there is nothing to draw."""
    fig = monitor.curves_figure(epoch_records(run), threshold)
    return None if fig is None else write_atomic(Path(run) / "curves.png",
                                                 lambda p: fig.savefig(p, format="png", dpi=90))


def data_identity(root, files=None):
    """What a result was computed on, recorded beside it and compared on every resume or rerun: the absolute path,
    the number of images and a SHA-256 of the data's description - the bytes of meta.json for a data_prep.py cache
    (its dataset, size, splits, labels), the image files' names and sizes for a plain folder (`files`). The one
    identity of adam.py, finetune.py, eve.py and ablate.py."""
    meta = Path(root) / "meta.json"
    if files is None and meta.is_file():
        text = meta.read_bytes()
        return {"path": str(Path(root).resolve()), "images": int(json.loads(text)["count"]),
                "sha256": hashlib.sha256(text).hexdigest()[:16]}
    h = hashlib.sha256()
    for f in sorted(os.path.relpath(f, root) for f in files or ()):
        h.update(f"{f}\t{(Path(root) / f).stat().st_size}\n".encode())
    return {"path": str(Path(root).resolve()), "images": len(files or ()), "sha256": h.hexdigest()[:16]}


def check_data(flag, value, saved, now, where):
    """Refuse to continue or extend `where` (a run, a results file) on other data than it was made on: another image
    count or another description (data_identity). The same data moved to another path is the same data. saved None:
    written before identities were recorded, nothing to compare."""
    if saved and (saved.get("images"), saved.get("sha256")) != (now["images"], now["sha256"]):
        raise ValueError(f"{flag} {value}: {now['path']} ({now['images']} images, sha256 {now['sha256']}) is not the "
                         f"data of {where} ({saved['path']}, {saved['images']} images, sha256 {saved['sha256']}): pass "
                         f"{flag} {saved['path']}, or pick another --out")


def resume(args, student, teacher, bank, say):
    """--resume: the last checkpoint's student, teacher, bank and RNG state -> (stage, epoch, step, checkpoint)
    to continue from; (0, 0, 0, None) for a fresh run. The optimiser state is restored by its stage."""
    if not args.resume:
        return 0, 0, 0, None
    ckpt = load_checkpoint(Path(args.resume) / "checkpoint.pth", keys=CHECKPOINT_KEYS)
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


CHECKPOINT_KEYS = ("args", "stage", "level", "epoch", "step", "student", "teacher", "bank", "bank_ptr", "optimizer",
                   "rng")


def check_resume(args, ckpt):
    """--resume DIR with flags passed again: refuse what the saved run cannot continue with, naming the flag: another
    backbone, embedding size or bank size (the saved weights do not fit), levels other than the stages it has
    trained, fewer epochs than its last stage has done, another weight decay or momentum in the middle of a stage
    (the restored optimiser state would keep the saved ones)."""
    saved, where = ckpt["args"], f"the run in {args.resume}"
    for key in ("arch", "dim", "queue_size"):
        if getattr(args, key) != saved.get(key):
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)}: {where} was trained with "
                             f"{saved.get(key)}; leave the flag out to continue it, or start a new run in another "
                             f"--out")
    done = [int(n) for n in str(saved["levels"]).split(",")][:ckpt["stage"] + 1]
    if args.level_list[:len(done)] != done:
        raise ValueError(f"--levels {args.levels}: {where} has trained level(s) {','.join(map(str, done))}; list "
                         f"them first (e.g. --levels {saved['levels']}), or start a new run in another --out")
    if ckpt["epoch"] > args.epochs:
        raise ValueError(f"--epochs {args.epochs}: {where} has done {ckpt['epoch']} epochs of level {ckpt['level']}; "
                         f"pass --epochs {ckpt['epoch']} or more")
    for key in ("wd", "momentum"):                # mid-stage, the saved optimiser state brings its own
        if ckpt["epoch"] < args.epochs and getattr(args, key) != saved.get(key):
            raise ValueError(f"--{key} {getattr(args, key):g}: {where} is in the middle of its level-{ckpt['level']} "
                             f"stage, whose optimiser state keeps --{key} {saved.get(key):g}; leave the flag out, or "
                             f"change it where a new stage starts")


def run_files(out, trained_only=False):
    """What a run wrote in OUT: checkpoint, log, exported backbones, and (unless trained_only) args.json and the
    TensorBoard folder, which a run that stopped before its first epoch leaves alone."""
    out = Path(out)
    names = ("checkpoint.pth", "log.jsonl") + (() if trained_only else ("args.json", "tb"))
    return [out / n for n in names if (out / n).exists()] + sorted(out.glob("adam_*_level*.pth"))


def lock_out(out, prog, flag="--out"):
    """Lock the output folder of a run of `prog` (made when missing) for this process: a second process is refused at
    once, naming the flag and the holder (safe_files.FolderLock). Every script's folder is locked with it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return FolderLock(out / ".lock", f"{flag} {out} is in use by another {prog} run (pid {{pid}}): wait "
                                f"for it to end, or pick another {flag}")


@contextlib.contextmanager
def locked(out, prog, flag="--out"):
    """`with locked(OUT, "eve.py"):` holds lock_out's lock on OUT for the block, released however it ends."""
    lock = lock_out(out, prog, flag)
    try:
        yield lock
    finally:
        lock.release()


def claim(args):
    """Lock OUT for this run (another process writing it: refused at once) and refuse an OUT that holds another run
    unless this run continues it (--resume OUT) or replaces it (--overwrite: that run's files are deleted first).
    Returns the lock."""
    out = Path(args.out)
    lock = lock_out(out, "adam.py")
    found = run_files(out, trained_only=True)
    if found and not (args.resume and Path(args.resume).resolve() == out.resolve()):
        if not args.overwrite:
            lock.release()
            raise ValueError(f"--out {out} holds another run ({', '.join(f.name for f in found[:4])}"
                             f"{', ...' if len(found) > 4 else ''}): continue it with `--resume {out}`, pick a new "
                             f"--out, or pass --overwrite to replace it")
        for f in run_files(out):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    return lock


def again(out):
    """How to go on with the adam.py run in `out` after it stopped (a signal, a full disk): from its last checkpoint,
    or, with none, start again (--overwrite where trained files would make the same command refuse OUT)."""
    out = Path(out)
    if (out / "checkpoint.pth").is_file():
        return f"continue it with `python adam.py --resume {out}`"
    if run_files(out, trained_only=True):
        return f"it has no checkpoint yet: run the same command with --overwrite to start {out} again"
    return "nothing trained was saved: run the same command again"


def append_log(path, record):
    """Add an epoch's line to log.jsonl by rewriting the file atomically: strict JSON (a non-finite number becomes
    null, never a bare NaN) and each epoch once: the lines of this epoch and later ones, left by a run killed after
    its log line but before its checkpoint, are dropped when the resumed run redoes that epoch."""
    path, key, lines = Path(path), (record["stage"], record["epoch"]), []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
            if (r["stage"], r["epoch"]) < key:
                lines.append(line)
        except (ValueError, KeyError, TypeError):  # a torn line (a file from an older version): dropped
            pass
    lines.append(json.dumps(json_safe(record), allow_nan=False))
    write_atomic(path, lambda p: Path(p).write_text("".join(line + "\n" for line in lines)))


def json_safe(x):
    """x with every NaN or infinite float (nested in dicts, lists, tuples) replaced by None: strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return [json_safe(v) for v in x] if isinstance(x, (list, tuple)) else x


class RunFolder:
    """Rank 0's writer of OUT (other ranks get one that writes nothing): the lock on OUT and args.json when the run
    starts, TensorBoard scalars per step, and after each epoch the log line, the stage's backbones and the
    checkpoint, once the epoch's losses and weights are known to be finite (every rank checks).
    loss: the loss path for args.json (adam.loss_record); ckpt: the checkpoint a resumed run continues from (it
    carries the stage's best validation loss so far). data: data_identity of the training images, saved in args.json
    and the checkpoint; a resumed run on other data (a relative --data from another working directory, a regenerated
    cache) is refused before anything is written."""

    def __init__(self, args, loss, active=True, ckpt=None, data=None):
        self.args, self.out, self.active, self.data = args, Path(args.out), active, data
        self.tb, self.best = None, (ckpt or {}).get("best")  # best: {stage, level, epoch, val_loss} or None
        self.warned = set()                                  # collapse warnings already printed (monitor.py)
        self.lock = None
        if ckpt is not None and data is not None:
            flag = "--data-root" if args.data_root else "--data"
            check_data(flag, args.data_root or args.data, ckpt.get("data"), data, f"the run in {args.resume}")
        if active:
            self.lock = claim(args)
            try:
                write_args_json(self.out, args, loss, data)
                self.tb = tensorboard_writer(args, self.out)
            except BaseException:
                self.lock.release()
                raise

    def step(self, step, **scalars):
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, step)

    def end_of_epoch(self, record, student, teacher, bank, optimizer, summary):
        check_finite(record, self.args, student=student.state_dict(), teacher=teacher.state_dict(), bank=bank.queue)
        if not self.active:
            return
        try:
            self._write_epoch(record, student, teacher, bank, optimizer, summary)
        except DiskFull as e:  # say how this run goes on: --resume from the checkpoint kept
            if not hasattr(e, "path"):
                raise
            raise disk_full_error(e.path, then=again(self.out)) from None

    def _write_epoch(self, record, student, teacher, bank, optimizer, summary):
        args, out = self.args, self.out
        out.mkdir(parents=True, exist_ok=True)
        best = self.best if self.best and self.best["stage"] == record["stage"] else None
        val = record.get("val_loss")
        improved = val is not None and math.isfinite(val) and (best is None or val < best["val_loss"])
        if improved:
            best = self.best = {k: record[k] for k in ("stage", "level", "epoch")} | {"val_loss": val}
        record["best_epoch"] = best["epoch"] if best else None  # the stage's lowest validation loss so far
        append_log(out / "log.jsonl", record)
        for line in monitor.collapse_warnings(record, self.warned):
            print(line, flush=True)
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
                        bank_ptr=bank.ptr, optimizer=optimizer.state_dict(), rng=rng, best=best, data=self.data)
        if record["epoch"] == args.epochs:                         # end of a stage, and of the run after the last
            write_curves(out, args.threshold)
        if self.tb:
            for key in ("loss", "lr", "pruned", "images_per_s", "val_loss") + monitor.FIELDS:
                if record.get(key) is not None:
                    self.tb.add_scalar(f"epoch/{key}", record[key], record["step"])
            self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()
        if self.lock:
            self.lock.release()


def write_args_json(out, args, loss, data=None):
    """OUT/args.json when a run starts: every setting, the identity of the data (data_identity), the versions of
    python, torch, torchvision, CUDA and the op, the loss path (loss: {"loss": which function trains, "adam_ext": the
    op's build}, from adam.loss_record), the git commit of this file's checkout (null outside one) and the command
    line. A resumed run keeps the earlier starts under "previous_starts"."""
    def git(*cmd):
        try:
            r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *cmd], capture_output=True,
                               text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
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

    info = {"args": dict(vars(args)), "data": data, "loss": loss["loss"],
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": numpy.__version__,
                         "adam_ext": loss["adam_ext"], "cuda": torch.version.cuda},
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


# -----------------------------------------------------------------------------
# The end of every script: an error a user can fix, or a signal, as one line.

class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that the same clean-up runs: the
    temporary file of a write in progress is removed (write_atomic), the folder's lock released."""


def _interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def command_line(prog, main, errors, note=lambda: ""):
    """Run a script's main() as its command: an error of `errors` (bad input, a full disk, a busy folder) ends in
    "PROG: error: ..." (its last line: an error from a DataLoader worker arrives with the worker's traceback), exit
    status 1; Ctrl-C (SIGINT) or SIGTERM in "PROG: interrupted by SIGINT; NOTE", exit status 128 + the signal's
    number, no traceback. note(): what the script kept and how to go on, asked when the signal came."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except KeyboardInterrupt as e:
        name = str(e) if isinstance(e, Interrupted) else "SIGINT"
        signal.signal(signal.SIGINT, signal.SIG_IGN)               # a second Ctrl-C does not cut the message
        print(f"{prog}: interrupted by {name}; {note()}", file=sys.stderr, flush=True)
        sys.exit(128 + getattr(signal, name))
    except errors as e:
        sys.exit(f"{prog}: error: {(str(e).strip().splitlines() or [type(e).__name__])[-1]}")


# -----------------------------------------------------------------------------
# The scripts' flags, checked when parsed: argparse types, so a degenerate setting ends in one line naming the flag
# before anything runs.

class Parser(argparse.ArgumentParser):
    """argparse with an error as one line (the flag, what is wrong, --help), not after the whole usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(cast=int, low=None, high=None, low_open=False, why=""):
    """An argparse type: `cast` of the text, finite, in [low, high] ((low, high] with low_open); `why` is said
    with a refusal."""
    g = str if cast is int else lambda x: f"{x:g}"
    what = ("an integer" if cast is int else "a number") + (
        "" if low is None else f" {'>' if low_open else '>='} {g(low)}" if high is None
        else f" in {'(' if low_open else '['}{g(low)}, {g(high)}]") + (f" ({why})" if why else "")

    def parse(text):
        try:
            x = cast(text)
        except ValueError:
            x = None
        if x is None or not math.isfinite(x) or low is not None and (x <= low if low_open else x < low) \
                or high is not None and x > high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return x
    return parse


def threshold(text):
    """--threshold: a cosine in (-1, 1] (at -1 the pruner would drop every negative and the loss be zero), or
    'off' (= 1: nothing is pruned)."""
    if text.strip().lower() == "off":
        return 1.0
    try:
        return number(float, -1, 1, low_open=True)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cosine in (-1, 1] or 'off'") from None


def levels(text):
    """--levels: comma-separated levels 0..16, coarse to fine (kept as the text, as args.json and checkpoints hold
    it): each stage starts from the one before (docs/METHOD.md §5), and a level listed twice would write its stage's
    exports over the first's. Whether the finest one fits the images and --img-size is checked when the data is
    open (adam.open_data)."""
    try:
        n = [int(x) for x in text.split(",")]
        ok = all(0 <= x <= 16 for x in n)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated levels 0..16, e.g. 0,2,4")
    if any(a >= b for a, b in zip(n, n[1:])):
        raise argparse.ArgumentTypeError(f"{text!r}: levels go coarse to fine, each once (e.g. "
                                         f"{','.join(map(str, sorted(set(n))))}): a stage continues from the coarser "
                                         f"one before it, and a repeated level would overwrite its exports")
    return text


# --seed: numpy's and torch's generators take any value in this range; adam.py's sampler mixes it into a 64-bit seed.
seed = number(int, 0, 2**32 - 1)


def out_folder(text):
    """--out: a folder (made when missing), not a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: pick a folder for the outputs")
    return text


def resolve_device(text):
    """--device auto -> cuda where torch sees a GPU, else cpu; other values (checked by `device`) as they are."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if text == "auto" else text


def device(text):
    """--device: auto, cpu, cuda or cuda:N, checked against the GPUs torch sees (every script's)."""
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")
    n = torch.cuda.device_count() if text.startswith("cuda") else 0
    if text.startswith("cuda") and n == 0:
        raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA GPU (no GPU or driver here, or a CPU build of "
                                         f"torch {torch.__version__}); use --device cpu")
    if m.group(1) and int(m.group(1)) >= n:
        raise argparse.ArgumentTypeError(f"{text}: torch sees {n} GPU(s), cuda:0 to cuda:{n - 1}")
    return text
