"""Python side of the fused op: the public info_nce(), autograd and the fake (meta) impl.

The C++ op adam::info_nce_fwd (csrc/info_nce.cpp, csrc/info_nce_cuda.cu) returns per anchor
    loss_i = lse_i - x0_i,  lse_i,  n_pruned_i,  pb_i = sum_{kept j} p_ij b_j   (B, B, B, B x D)
and the backward (docs/METHOD.md §4, "Gradients") needs only those, O(B x D), no second bank pass:
    p_i0 = exp(x0_i - lse_i) = exp(-loss_i)
    dL/dq_i = g_i ((p_i0 - 1) k_i + pb_i) / T,     dL/dk_i = g_i (p_i0 - 1) q_i / T.
The pruning mask is piecewise constant in q, so it contributes no gradient (as in the reference).
"""
import math

import torch

_registered = False  # set by _register() once the compiled library is loaded
lib_error = None     # why the compiled library did not load (set by adam_ext/__init__.py), for build_info()


def is_built():
    """True when the compiled op is loaded (from `pip install -e .` or ADAM_EXT_JIT=1)."""
    try:
        torch.ops.adam.info_nce_fwd
        return True
    except (AttributeError, RuntimeError):
        return False


def build_info():
    """e.g. "CPU+CUDA(sm_80,sm_90)", "CPU", or "not built: <why>"."""
    if not is_built():
        return f"not built: {lib_error} (run: pip install --no-build-isolation -e .)"
    return torch.ops.adam.build_info().replace("_sm_", ",sm_")


def info_nce(q, k, queue, temperature, threshold, return_pruned=False):
    """Fused purposive pruning + InfoNCE: same contract as adam.info_nce (docs/METHOD.md §4).

    q, k: (B, D) anchors and positive keys, queue: (K, D) bank; all L2-normalised, same dtype
    (float32, float64, bfloat16, float16) and device. Entry j is kept for anchor i iff
    q_i.b_j < threshold (None: keep all); the positive is always kept. Returns the mean loss
    (0-dim; float64 for float64 inputs, float32 otherwise - bf16 inputs are accumulated in fp32),
    or (loss, pruned_fraction) with return_pruned=True, pruned_fraction = mean_i #{j pruned}/K
    (0-dim, no grad). Gradients flow to q and k, never to queue.
    """
    if not _registered:
        raise RuntimeError("adam_ext: the compiled op is not built; run "
                           "`pip install --no-build-isolation -e .` in the repo root (or set ADAM_EXT_JIT=1)")
    if not (q.device == k.device == queue.device):  # before dispatch: it picks one device's kernel for all
        raise RuntimeError(f"adam::info_nce: q, k and queue must be on one device; q is on {q.device}, "
                           f"k on {k.device}, queue is on {queue.device}")
    t = math.inf if threshold is None else float(threshold)
    # The queue is never copied (a (K, D) copy is what the op exists to avoid); q and k are small.
    q, k = q.contiguous(), k.contiguous()
    need_pb = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    loss_i, _lse, n_pruned, _pb = torch.ops.adam.info_nce_fwd(q, k, queue, float(temperature), t, need_pb)
    loss = loss_i.mean()
    if not return_pruned:
        return loss
    pruned = (n_pruned.sum().to(loss.dtype) / (n_pruned.numel() * queue.shape[0])).detach()
    return loss, pruned


def _setup_context(ctx, inputs, output):
    q, k, queue, temperature, threshold, need_pb = inputs
    loss_i, lse, n_pruned, pb = output
    ctx.temperature = temperature
    ctx.save_for_backward(q, k, loss_i, pb)
    ctx.mark_non_differentiable(lse, n_pruned, pb)


def _backward(ctx, g_loss, g_lse, g_cnt, g_pb):
    q, k, loss_i, pb = ctx.saved_tensors
    if g_loss is None:  # only the non-differentiable outputs were used
        return None, None, None, None, None, None
    if q.shape[1] and pb.shape[1] != q.shape[1]:
        raise RuntimeError("adam::info_nce_fwd was called with need_pb=False, so it cannot be "
                           "differentiated; call adam_ext.info_nce with grad enabled")
    acc = loss_i.dtype
    # no double backward: pb and loss_i are saved outputs, their dependence on q is not recorded
    with torch.no_grad():
        T = ctx.temperature
        coef = (torch.exp(-loss_i) - 1.0)[:, None]        # B x 1   p_i0 - 1
        g = (g_loss / T)[:, None]                          # B x 1
        grad_q = g * (coef * k.to(acc) + pb)               # B x D
        grad_k = g * coef * q.to(acc)                      # B x D
    return grad_q.to(q.dtype), grad_k.to(k.dtype), None, None, None, None


def _fake(q, k, queue, temperature, threshold, need_pb):
    """Shapes and dtypes only, for torch.compile / FakeTensor tracing."""
    B, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty((B,), dtype=acc), q.new_empty((B,), dtype=acc),
            q.new_empty((B,), dtype=torch.int64), q.new_empty((B, D if need_pb else 0), dtype=acc))


def _register():
    try:
        torch.ops.adam.info_nce_fwd
    except (AttributeError, RuntimeError):
        return  # not built: adam_ext.is_built() is False and info_nce raises when called
    torch.library.register_autograd("adam::info_nce_fwd", _backward, setup_context=_setup_context)
    torch.library.register_fake("adam::info_nce_fwd")(_fake)
    global _registered
    _registered = True
