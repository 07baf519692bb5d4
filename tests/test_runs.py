"""adam_cxr/runs.py, readable runs: OUT/args.json at the start of every adam.py run (settings, versions, commit, the
loss path adam.choose_loss picked), the optional TensorBoard scalars (--tensorboard), never required, and the
epoch records read back from log.jsonl."""
import json
import subprocess
import sys
import types

import pytest
import torch
import torchvision

import adam
from adam_cxr import monitor, runs
from helpers import ROOT, train_tiny


@pytest.mark.slow
def test_args_json_holds_settings_versions_commit(tiny_adam_run):
    info = json.loads((tiny_adam_run / "args.json").read_text())
    saved = torch.load(tiny_adam_run / "checkpoint.pth", weights_only=True)["args"]
    assert info["args"] == json.loads(json.dumps(saved, default=str))    # every setting, as the checkpoint has them
    assert info["args"]["queue_size"] == 60 and info["args"]["levels"] == "0,2" and info["args"]["arch"] == "resnet18"
    v = info["versions"]
    assert v["torch"] == torch.__version__ and v["torchvision"] == torchvision.__version__
    assert v["adam_ext"] and v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["loss"] in ("fused adam_ext op", "pure-PyTorch reference")
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        head = ""
    assert info["commit"] == (head or None)
    assert info["previous_starts"] == []


@pytest.mark.slow
def test_resume_keeps_the_earlier_start(phantom_root, tmp_path):
    out = tmp_path / "run"
    train_tiny(phantom_root, out, "--levels", "0", "--steps-per-epoch", "1")
    first = json.loads((out / "args.json").read_text())
    assert first.pop("previous_starts") == []
    adam.main(["--resume", str(out), "--epochs", "2"])
    info = json.loads((out / "args.json").read_text())
    assert info["args"]["epochs"] == 2 and info["args"]["resume"] == str(out)
    assert info["previous_starts"] == [first]


class _FakeWriter:
    """Stands for torch.utils.tensorboard.SummaryWriter: records what adam.py writes."""
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.mark.slow
def test_tensorboard_scalars_match_the_log(phantom_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_FakeWriter))
    out = tmp_path / "tb_run"
    train_tiny(phantom_root, out, "--tensorboard")
    (w,) = _FakeWriter.made
    assert w.log_dir == str(out / "tb") and w.closed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "pruned", "images_per_s") + monitor.FIELDS:
        assert [(v, s) for t, v, s in w.scalars if t == f"epoch/{key}"] == [(r[key], r["step"]) for r in log]
    steps = [s for t, _, s in w.scalars if t == "train/loss"]
    assert steps == list(range(1, log[-1]["step"] + 1))            # one point per training step


@pytest.mark.slow
def test_tensorboard_without_the_package_is_one_clear_error(phantom_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails as if not installed
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train_tiny(phantom_root, tmp_path / "x", "--tensorboard")
    assert not (tmp_path / "x" / "checkpoint.pth").exists()


@pytest.mark.slow
def test_tensorboard_event_files_when_installed(phantom_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb_real"
    train_tiny(phantom_root, out, "--tensorboard")
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    got = [(e.step, e.value) for e in acc.Scalars("epoch/loss")]
    assert got == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log]


def test_without_the_op_auto_uses_the_reference_and_says_so(monkeypatch):
    """The op is optional: an install without it (or where it does not load) trains with the reference and says
    so (README 'Install with your own torch'); only --loss fused insists on it."""
    monkeypatch.setitem(sys.modules, "adam_ext", None)           # import adam_ext fails as if never built
    said = []
    assert adam.choose_loss("auto", torch.device("cpu"), said.append) is adam.info_nce
    assert len(said) == 1 and said[0].startswith("loss: pure-PyTorch reference (auto; adam_ext not importable")
    with pytest.raises(ValueError, match="--loss fused: adam_ext is not importable"):
        adam.choose_loss("fused", torch.device("cpu"), said.append)


def test_epoch_records_keep_the_last_line_of_a_repeated_epoch(tmp_path):
    lines = [dict(stage=0, level=0, epoch=1, step=3, loss=5.0), dict(stage=0, level=0, epoch=2, step=6, loss=4.0),
             dict(stage=0, level=0, epoch=2, step=6, loss=3.5), dict(stage=1, level=2, epoch=1, step=9, loss=3.0)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r["loss"] for r in runs.epoch_records(tmp_path)] == [5.0, 3.5, 3.0]
