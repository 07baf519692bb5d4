"""The fused op's self-check (adam_ext/selfcheck.py): it passes on a correct op, and a planted wrong
result - in the loss, in the gradient, or in what is pruned - makes `--loss auto` fall back to the
reference with a message naming the kernel and the shape, and `--loss fused` stop."""
import math

import pytest
import torch

import adam
import adam_ext
from adam_ext import selfcheck
from helpers import TINY_RUN

pytestmark = pytest.mark.skipif(not adam_ext.is_built(), reason="adam_ext not built: "
                                "pip install --no-build-isolation -e .")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(selfcheck, "_checked", {})


def planted(fault):
    """adam_ext.info_nce with one planted fault: 'loss' (x 1.001), 'grad' (dL/dq x 1.01 through a
    hook), 'pruning' (the pruned fraction a whisker off), 'nan' (NaN rows treated as pruned)."""
    real = adam_ext.ops.info_nce

    def op(q, k, queue, temperature, threshold, return_pruned=False):
        if fault == "nan":  # the bug the op once had: a NaN score counted as pruned
            queue = torch.nan_to_num(queue, nan=0.0)
        if fault == "grad" and q.requires_grad:
            q = q * 1.0
            q.register_hook(lambda g: g * 1.01)
        loss, pruned = real(q, k, queue, temperature, threshold, return_pruned=True)
        if fault == "loss":
            loss = loss * 1.001
        if fault == "pruning":
            pruned = pruned + 1e-4
        return (loss, pruned) if return_pruned else loss
    return op


def test_the_op_passes_its_self_check_on_the_cpu():
    results = adam_ext.self_check(CPU, adam.info_nce)
    assert results and all(r["ok"] for r in results), selfcheck.failure_line(results)
    assert {r["dtype"] for r in results} >= {"f32", "f64"} and any(not r["grad"] for r in results)
    assert all(r["pruned"] > 0 for r in results), "every case must exercise the pruner"
    assert adam_ext.self_check(CPU, adam.info_nce) is results  # once per process and device


def test_the_full_cpu_scale_passes_including_a_nan_bank_row():
    results = adam_ext.self_check(CPU, adam.info_nce, scale="full")
    assert all(r["ok"] for r in results), selfcheck.failure_line(results)
    nan = [r for r in results if r["nan_row"]]
    assert nan and all(math.isnan(r["loss"]) and math.isnan(r["loss_ref"]) for r in nan)


@pytest.mark.parametrize("fault", ["loss", "grad", "pruning"])
def test_a_planted_fault_is_caught_and_named(fault):
    results = adam_ext.self_check(CPU, adam.info_nce, op=planted(fault), force=True)
    line = selfcheck.failure_line(results)
    assert line.startswith("kernel cpu, f32 B=37 D=128 K=5003"), line
    assert {"loss": "loss", "grad": "dL/dq", "pruning": "pruned fraction"}[fault] in line


def test_a_nan_treated_as_pruned_is_caught_at_full_scale():
    results = adam_ext.self_check(CPU, adam.info_nce, scale="full", op=planted("nan"))
    assert "NaN bank row" in selfcheck.failure_line(results)


def test_auto_falls_back_loudly_and_fused_stops():
    said = []
    assert adam_ext.choose_path("auto", CPU, adam.info_nce, said.append, op=planted("loss")) is adam.info_nce
    assert len(said) == 1 and said[0].startswith("WARNING: the fused op disagrees with adam.info_nce on cpu")
    assert "kernel cpu, f32 B=37 D=128 K=5003" in said[0] and "pure-PyTorch reference instead" in said[0]
    with pytest.raises(adam_ext.FusedOpError, match=r"--loss fused: .*kernel cpu, f32 B=37 D=128 K=5003: loss"):
        adam_ext.choose_path("fused", CPU, adam.info_nce, said.append, op=planted("loss"))
    said.clear()
    assert adam_ext.choose_path("auto", CPU, adam.info_nce, said.append) is adam_ext.info_nce  # the real op
    assert said[0].startswith("loss: fused adam_ext op") and "self-check on cpu" in said[0]
    assert adam_ext.choose_path("torch", CPU, adam.info_nce, said.append) is adam.info_nce


@pytest.mark.slow
def test_training_falls_back_with_a_planted_fault(phantom_root, tmp_path, monkeypatch, capsys):
    """adam.main end to end: --loss auto trains on the reference after the warning (same losses as
    --loss torch), --loss fused stops before the first step with the message."""
    monkeypatch.setattr(adam_ext.ops, "info_nce", planted("grad"))  # what choose_path checks and returns
    base = TINY_RUN + ["--data-root", str(phantom_root), "--levels", "2"]
    auto = adam.main(base + ["--out", str(tmp_path / "auto"), "--loss", "auto"])
    out = capsys.readouterr().out
    assert "WARNING: the fused op disagrees" in out and "kernel cpu" in out and "dL/dq" in out
    ref = adam.main(base + ["--out", str(tmp_path / "ref"), "--loss", "torch"])
    assert auto["stages"][0]["losses"] == ref["stages"][0]["losses"]
    with pytest.raises(ValueError, match="--loss fused: the fused op disagrees"):
        adam.main(base + ["--out", str(tmp_path / "fused"), "--loss", "fused"])
    assert not (tmp_path / "fused" / "checkpoint.pth").exists()
