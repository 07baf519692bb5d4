"""monitor.py: the embedding monitor's statistics against their definitions on the full B x K matrix, its
subsampling, and what a run writes (log.jsonl fields, the progress line, curves.png)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import adam
from adam_cxr import monitor
from helpers import train_tiny


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_statistics_are_their_definitions_when_nothing_is_subsampled():
    # B <= ANCHORS, K <= COLUMNS, one step per epoch: the monitor sees the whole B x K matrix
    q, noise, bank = unit(16, 8, seed=0), unit(16, 8, seed=1), unit(300, 8, seed=2)
    k = F.normalize(q + 0.5 * noise, dim=1)
    bank[:40] = F.normalize(q.repeat(3, 1)[:40] + 0.3 * bank[:40], dim=1)   # some entries close to anchors
    t = 0.7
    mon = monitor.Monitor(t, steps_per_epoch=1)
    mon.observe(0, q, k, bank)
    m = mon.summary()
    s = q @ bank.T                                                          # B x K
    med, p99 = torch.quantile(s.flatten(), torch.tensor([0.5, 0.99], dtype=s.dtype)).tolist()
    assert m["sim_median"] == pytest.approx(med, abs=1e-6)
    assert m["sim_p99"] == pytest.approx(p99, abs=1e-6)
    assert m["sim_max_median"] == pytest.approx(torch.quantile(s.max(1).values, 0.5).item(), abs=1e-6)
    _, pruned = adam.info_nce(q, k, bank, 0.2, t, return_pruned=True)      # what the loss would prune
    assert 0 < pruned < 1 and m["would_prune"] == pytest.approx(pruned.item(), abs=1e-9)
    assert m["pos_cos"] == pytest.approx((q * k).sum(1).mean().item(), abs=1e-6)
    # Wang & Isola's reference code: align_loss(x, y, alpha=2), uniform_loss(x, t=2)
    assert m["align"] == pytest.approx((q - k).norm(p=2, dim=1).pow(2).mean().item(), abs=1e-6)
    assert m["unif"] == pytest.approx(torch.pdist(q, p=2).pow(2).mul(-2).exp().mean().log().item(), abs=1e-6)
    assert "q.b med" in mon.brief() and "unif" in mon.brief()


@pytest.mark.slow
def test_subsample_is_few_steps_few_anchors_and_follows_the_bank_ages():
    B, K, steps = 64, 20000, 40
    torch.manual_seed(0)
    direction = unit(1, 16, seed=3)
    # a drifting bank: the older the key, the less it points along `direction` (as keys of a changing teacher)
    age = torch.linspace(0, 1, K)[:, None].double()
    bank = F.normalize(unit(K, 16, seed=4) + 3 * age * direction, dim=1)
    mon = monitor.Monitor(0.8, steps_per_epoch=steps)
    full = []
    for i in range(steps):
        q = F.normalize(unit(B, 16, seed=10 + i) + direction, dim=1)
        mon.observe(i, q, q, bank)
        full.append((q @ bank.T).flatten())
    assert mon.every == steps // monitor.SAMPLES and len(mon.sims) == math.ceil(steps / mon.every)
    assert mon.n == len(mon.sims) * monitor.ANCHORS * K                    # whole bank, ANCHORS anchors
    full = torch.cat(full)
    m = mon.summary()
    # quantiles from ~1/40 of the pairs, evenly spaced bank ages: within 0.01 of the whole matrix's
    ref = torch.quantile(full[::7].float(), torch.tensor([0.5, 0.99])).tolist()
    assert m["sim_median"] == pytest.approx(ref[0], abs=0.01) and m["sim_p99"] == pytest.approx(ref[1], abs=0.01)
    # the first COLUMNS rows alone (the oldest keys) would be far off: the spacing matters
    first = torch.quantile((q @ bank[:monitor.COLUMNS].T).flatten().float(), 0.5).item()
    assert abs(first - ref[0]) > 0.1


@pytest.mark.slow
def test_run_logs_the_monitor_prints_it_and_draws_curves(phantom_root, tmp_path, capsys):
    out = tmp_path / "run"
    train_tiny(phantom_root, out)
    printed = capsys.readouterr().out
    assert "q.b med" in printed and "align" in printed and "unif" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for r in log:
        assert all(math.isfinite(r[f]) for f in monitor.FIELDS), r
        assert -1 <= r["sim_median"] <= r["sim_p99"] <= 1 and 0 <= r["would_prune"] <= 1
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 800


def test_collapse_warnings_once_per_kind_and_not_for_a_spread_embedding():
    rec = lambda stage, epoch, unif, pruned: dict(stage=stage, level=2 * stage, epoch=epoch, unif=unif, pruned=pruned)
    warned = set()
    # the first epoch of a run is left out, whatever it shows
    assert monitor.collapse_warnings(rec(0, 1, -0.001, 1.0), warned) == [] and warned == set()
    # a spread embedding with a pruner that removes some pairs: nothing to say
    assert monitor.collapse_warnings(rec(0, 2, -2.5, 0.3), warned) == []
    assert monitor.collapse_warnings(rec(1, 1, monitor.COLLAPSED_UNIF - 1e-3, monitor.ALL_PRUNED - 1e-3), warned) == []
    assert monitor.collapse_warnings(rec(1, 1, float("nan"), 0.0), warned) == []
    # collapsed: both kinds, each naming where and the value
    lines = monitor.collapse_warnings(rec(1, 3, -0.004, 0.996), warned)
    assert len(lines) == 2 and all(line.startswith("warning: ") for line in lines)
    assert "99.6%" in lines[0] and "level 2 epoch 3" in lines[0] and "-0.004" in lines[1]
    # ... and only once per run
    assert monitor.collapse_warnings(rec(1, 4, -0.001, 1.0), warned) == []
    # one kind alone
    assert len(monitor.collapse_warnings(rec(1, 2, -0.01, 0.0), set())) == 1
