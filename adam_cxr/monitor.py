"""The embedding monitor of adam.py: what the Purposive Pruner sees and how the embedding is shaped, per epoch,
cheap enough to stay on; and OUT/curves.png, the run's figure. Bookkeeping beside the method, like runs.py.

Per epoch, in log.jsonl and the progress line (q, k, b unit vectors; s = q.b, the pruner's similarity,
docs/METHOD.md §4):
    sim_median, sim_p99   quantiles of s over (anchor, bank entry) pairs
    sim_max_median        the median over anchors of each anchor's largest s over the whole bank: once it
                          reaches t, the pruner removes something for at least half of the anchors
    would_prune           the fraction of pairs with s >= t, also where the pruner is off (level 0, t >= 1):
                          what it would remove there ("pruned", from the loss itself, is what it did remove)
    pos_cos               the mean positive cosine q.k
    align, unif           alignment E||q - k||^2 (= 2 - 2 pos_cos for unit vectors) and uniformity
                          log E_{i != j} exp(-2 ||q_i - q_j||^2) over the anchors (Wang & Isola, ICML 2020, with
                          their alpha = 2, t = 2); lower is better for both
These need s for every pair, the B x K matrix the fused op exists to avoid. The monitor computes it for a
subsample instead: the first ANCHORS anchors of the batch (the sampler shuffles, so they are a random sample of
it) against the whole bank, on every (steps per epoch // SAMPLES)-th step - every step of an epoch shorter than
32 steps, else 16 to 31 steps evenly spread over it - before the batch's keys enter the bank: exactly the q and
the bank the loss saw at that step. The whole bank is needed for each anchor's largest s (a subsample of the
bank would underestimate a maximum); the quantiles use COLUMNS evenly spaced bank rows (the bank is a FIFO, so
these are keys of evenly spaced ages). Cost per sampled step: an ANCHORS x K product, an eighth of the 256 x K
one at the paper's batch. At the demo's sizes (B = 32, K = 2048, 21 steps per epoch) it is the whole B x K
product on every step, i.e. exact; on long epochs the estimates pool 512-992 anchors per epoch.
"""
import math
import sys

import torch

ANCHORS = 32    # anchors per sampled step
COLUMNS = 1024  # bank rows per sampled step for the quantiles
SAMPLES = 16    # sampled steps per epoch
FIELDS = ("sim_median", "sim_p99", "sim_max_median", "would_prune", "pos_cos", "align", "unif")


class Monitor:
    def __init__(self, threshold, steps_per_epoch):
        self.t, self.every = threshold, max(1, steps_per_epoch // SAMPLES)
        self.reset()

    def reset(self):
        """A new epoch (observe does it at step 0)."""
        self.sims, self.maxes, self.pos, self.pairs = [], [], [], []
        self.ge_t, self.n = 0, 0

    @torch.no_grad()
    def observe(self, i, q, k, queue):
        """Step i (0-based) of the epoch: q, k B x D, queue K x D, before k enters the bank."""
        if i == 0:
            self.reset()
        if i % self.every:
            return
        qa = q[:ANCHORS].detach().float()                                  # A x D
        s = qa @ queue.float().t()                                         # A x K
        cols = torch.linspace(0, s.shape[1] - 1, min(COLUMNS, s.shape[1]), device=s.device).round().long()
        self.sims.append(s[:, cols].flatten())
        self.maxes.append(s.max(dim=1).values)
        self.ge_t += (s >= self.t).sum()
        self.n += s.numel()
        self.pos.append((qa * k[:len(qa)].float()).sum(dim=1))            # A
        a = len(qa)
        d2 = (2 - 2 * qa @ qa.t()).clamp_min(0)                            # A x A squared distances
        self.pairs.append(torch.exp(-2 * d2[~torch.eye(a, dtype=torch.bool, device=d2.device)]))

    def summary(self):
        """The epoch so far as {field: float}; {} before the first sampled step."""
        if not self.sims:
            return {}
        sims = torch.cat(self.sims).float().cpu()
        med, p99 = torch.quantile(sims, torch.tensor([0.5, 0.99])).tolist()
        pos = torch.cat(self.pos).mean().item()
        pairs = torch.cat(self.pairs)
        max_median = torch.quantile(torch.cat(self.maxes).float().cpu(), 0.5).item()
        return {"sim_median": med, "sim_p99": p99, "sim_max_median": max_median,
                "would_prune": (self.ge_t / self.n).item(), "pos_cos": pos, "align": 2 - 2 * pos,
                "unif": math.log(pairs.mean().item()) if len(pairs) and pairs.mean() > 0 else float("nan")}

    def brief(self):
        """The progress line's part: 'q.b med 0.12 p99 0.45 max 0.79 (t 0.8) q.k 0.93 align 0.14 unif -3.21'."""
        m = self.summary()
        if not m:
            return ""
        return (f" | q.b med {m['sim_median']:.2f} p99 {m['sim_p99']:.2f} max {m['sim_max_median']:.2f} "
                f"(t {self.t:g}) q.k {m['pos_cos']:.2f} align {m['align']:.2f} unif {m['unif']:.2f}")


# Collapse, as the monitor sees it. A spread embedding scores a uniformity well below -1 (directions at random in
# 128-d: about -4; a randomly initialised ResNet on a batch of views: about -0.7); above COLLAPSED_UNIF the anchors
# of a batch sit at nearly one point. With the pruner on, a collapsed embedding puts every bank key within t of its
# anchor: all of them are pruned, the loss is ~0 and nothing pushes the anchors apart again - a fixed point (README,
# "Ablations", measured there). The first epoch is left out: a run starts from wherever its random init puts it.
COLLAPSED_UNIF, ALL_PRUNED = -0.05, 0.99


def collapse_warnings(record, warned):
    """Lines to print for this epoch record (once per kind and run; `warned` is the run's set of kinds seen)."""
    if record["stage"] == 0 and record["epoch"] == 1:
        return []
    where, lines = f"at level {record['level']} epoch {record['epoch']}", []
    unif, pruned = record.get("unif"), record.get("pruned", 0.0)
    if pruned >= ALL_PRUNED and "pruned" not in warned:
        warned.add("pruned")
        lines.append(f"warning: the pruner removed {100 * pruned:.1f}% of the bank {where}: every negative is within "
                     f"t of its anchor, so the loss (~0) no longer pushes anchors apart and the embedding stays "
                     f"collapsed; raise --threshold or prune only after level 0 (docs/learning.md)")
    if unif is not None and math.isfinite(unif) and unif > COLLAPSED_UNIF and "unif" not in warned:
        warned.add("unif")
        lines.append(f"warning: uniformity {unif:.3f} {where}: the anchors of a batch map to nearly one point "
                     f"(a spread embedding scores well below -1); the loss then tells current keys from older "
                     f"bank entries, not images apart (docs/learning.md)")
    return lines


def stage_ends(records):
    """The last record of every stage (records in step order)."""
    return [r for r, nxt in zip(records, records[1:] + [None]) if nxt is None or nxt["stage"] != r["stage"]]


def curves_figure(records, threshold):
    """The run's figure (OUT/curves.png, written by runs.write_curves) from its epoch records in step order: loss and
    validation loss, lr, pruned fraction, the similarity quantiles against the threshold line, alignment and
    uniformity; dotted lines end each stage. A matplotlib Figure, or None without records or without matplotlib
    (then one line on stderr: training does not need it)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure to close
    except ImportError as e:
        print(f"curves.png skipped: matplotlib is not importable ({e}); log.jsonl has the numbers",
              file=sys.stderr)
        return None
    if not records:
        return None
    step = [r["step"] for r in records]
    col = lambda key, scale=1: [r[key] * scale if r.get(key) is not None else float("nan") for r in records]
    fig = Figure(figsize=(15, 7.5))
    axes = fig.subplots(2, 3)
    (a_loss, a_lr, a_pr), (a_sim, a_al, a_un) = axes
    a_loss.plot(step, col("loss"), "o-", ms=3, label="train loss")
    a_loss.plot(step, col("val_loss"), "s--", ms=3, label="val loss")
    a_loss.set(title="InfoNCE loss", ylabel="loss")
    a_lr.plot(step, col("lr"), "o-", ms=3)
    a_lr.set(title="learning rate", ylabel="lr")
    a_pr.plot(step, col("pruned", 100), "o-", ms=3, label="pruned (by the loss)")
    a_pr.plot(step, col("would_prune", 100), "x--", ms=4, label="q.b >= t (also where the pruner is off)")
    a_pr.set(title="Purposive Pruner: share of the bank removed", ylabel="% of anchor-bank pairs")
    for key, label in (("sim_max_median", "median over anchors of max_j q.b_j"), ("sim_p99", "q.b 99th percentile"),
                       ("sim_median", "q.b median"), ("pos_cos", "q.k (positive) mean")):
        a_sim.plot(step, col(key), "o-", ms=3, label=label)
    a_sim.axhline(threshold, color="red", ls="--", lw=1, label=f"pruner threshold t = {threshold:g}")
    a_sim.set(title="cosine similarities", ylabel="cosine")
    a_al.plot(step, col("align"), "o-", ms=3)
    a_al.set(title="alignment E||q - k||^2 (lower: views agree)", ylabel="alignment")
    a_un.plot(step, col("unif"), "o-", ms=3)
    a_un.set(title="uniformity log E exp(-2||q_i - q_j||^2) (lower: spread)", ylabel="uniformity")
    for ax in axes.flat:
        for r in stage_ends(records):
            ax.axvline(r["step"], color="grey", ls=":", lw=1)
            ax.text(r["step"], 1.0, f" level {r['level']} ", transform=ax.get_xaxis_transform(), ha="right",
                    va="top", fontsize=7, color="grey")
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
