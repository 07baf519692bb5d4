"""The fused op (adam_ext, csrc/) against the readable reference adam.info_nce (docs/METHOD.md §4).

Tolerances. float32: both sides compute the same fp32 dot products and log-sum-exps, in different
orders (GEMM blocking and an online, split log-sum-exp versus one logsumexp over B x (1+K)), so
they differ by a few ulp of the largest terms: rtol 1e-5 on the loss (~10), atol 1e-6 + rtol 1e-4
on gradients (entries ~1e-2). float64: 1e-10. bf16 inputs: the op upcasts them exactly to fp32,
so it must match the fp32 reference on the same (upcast) values at fp32 tolerance.
Pruning counts are compared exactly: planted near-duplicates sit far above t, random cosines
at D >= 64 sit far below it, so no entry is within rounding distance of the threshold.
CUDA variants run the same checks when a GPU is present and skip otherwise.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import adam
import adam_ext
from helpers import loss_inputs, tc_lse_reference

pytestmark = pytest.mark.skipif(not adam_ext.is_built(), reason="adam_ext not built: "
                                "pip install --no-build-isolation -e .")

HAS_CUDA = torch.cuda.is_available() and "CUDA" in adam_ext.build_info()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
# On CUDA every test runs twice: "cuda" with the launcher's own choice (TILED for float32 at D in
# {64, 128, 256} under torch's default "highest" float32 precision, TC for bf16 at D <= 128,
# SIMPLE otherwise) and "cuda-simple" with the SIMPLE kernel forced
# (ADAM_INFO_NCE_CUDA_KERNEL=simple, set by the autouse fixture below from the test id).
# test_tf32_mode_runs_the_tc_kernel covers float32 on tensor cores.
DEVICES = ["cpu", pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, needs_cuda]),
           pytest.param("cuda", id="cuda-simple", marks=[pytest.mark.cuda, needs_cuda])]


@pytest.fixture(autouse=True)
def _cuda_kernel_choice(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    simple = callspec is not None and "cuda-simple" in callspec.id
    monkeypatch.setenv("ADAM_INFO_NCE_CUDA_KERNEL", "simple" if simple else "auto")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
GTOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def make(B, D, K, dtype=torch.float32, device="cpu", planted=0, noise=0.02, seed=0):
    """helpers.loss_inputs (the first `planted` bank rows near-duplicates of q_0, q_1, ...) in dtype on device."""
    return [t.to(device=device, dtype=dtype) for t in loss_inputs(B, D, K, planted, noise, seed)]


def both(q, k, bank, T, t):
    """(loss, pruned fraction, dq, dk) from the reference and from the op, on the same inputs."""
    out = []
    for info_nce in (adam.info_nce, adam_ext.info_nce):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss, pruned = info_nce(qq, kk, bank, T, t, return_pruned=True)
        dq, dk = torch.autograd.grad(loss, (qq, kk))
        out.append((loss.detach(), float(pruned), dq, dk))
    return out


# (B, D, K): B = 1; B and K not multiples of any tile (16, 64, 4096); D in {64, 128, 256};
# K > 4096 so the CPU kernel uses several chunks and both threads' splits.
SHAPES = [(1, 64, 100), (37, 128, 5003), (13, 256, 777), (300, 64, 9001)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,D,K", SHAPES)
@pytest.mark.parametrize("case", ["none", "t>=1", "planted", "all"])
def test_matches_reference(device, B, D, K, case):
    planted = min(K // 4, 3 * B) if case == "planted" else 0
    q, k, bank = make(B, D, K, device=device, planted=planted, seed=B * K + D)
    t = {"none": None, "t>=1": 1.5, "planted": 0.8, "all": -2.0}[case]
    (l0, p0, dq0, dk0), (l1, p1, dq1, dk1) = both(q, k, bank, 0.2, t)
    torch.testing.assert_close(l1, l0.float(), **TOL[torch.float32])
    torch.testing.assert_close(dq1, dq0, **GTOL[torch.float32])
    torch.testing.assert_close(dk1, dk0, **GTOL[torch.float32])
    assert p1 == pytest.approx(p0, abs=1e-7)
    # each planted row is a near-duplicate of one anchor only: pruned for that anchor alone
    expected = {"none": 0.0, "t>=1": 0.0, "planted": planted / (B * K), "all": 1.0}[case]
    assert p1 == pytest.approx(expected, abs=1e-7), "planted duplicates must be pruned, nothing else"
    if case == "all":  # only the positive left: loss 0 and no gradient
        assert float(l1) == 0.0 and float(dq1.abs().max()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_float64_threshold_in_the_bulk(device):
    """t = 0.05 cuts through the mass of random cosines (prunes ~25% at D = 64); in float64 no
    cosine lands within rounding distance of t, so masks agree entry by entry."""
    q, k, bank = make(29, 64, 4999, dtype=torch.float64, device=device, seed=3)
    (l0, p0, dq0, dk0), (l1, p1, dq1, dk1) = both(q, k, bank, 0.07, 0.05)
    assert 0.1 < p1 < 0.5 and p1 == pytest.approx(p0, abs=1e-7)  # the reference's fraction is fp32
    torch.testing.assert_close(l1, l0, **TOL[torch.float64])
    torch.testing.assert_close(dq1, dq0, **GTOL[torch.float64])
    torch.testing.assert_close(dk1, dk0, **GTOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(device, dtype):
    q, k, bank = make(21, 128, 3001, dtype=dtype, device=device, planted=30, seed=5)
    qq = q.float().requires_grad_()
    ref = adam.info_nce(qq, k.float(), bank.float(), 0.2, 0.8)
    dref, = torch.autograd.grad(ref, qq)
    q1 = q.clone().requires_grad_()
    loss, pruned = adam_ext.info_nce(q1, k, bank, 0.2, 0.8, return_pruned=True)
    dq, = torch.autograd.grad(loss, q1)
    assert loss.dtype == torch.float32 and dq.dtype == dtype
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    torch.testing.assert_close(dq.float(), dref, rtol=1e-2, atol=1e-4)  # dq rounded to dtype
    assert float(pruned) == pytest.approx(30 / (21 * 3001))


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_path_and_float64_loss_dtype(device):
    """Under no_grad the op skips sum_j p_ij b_j; the loss must not change."""
    q, k, bank = make(5, 64, 700, dtype=torch.float64, device=device, planted=5, seed=9)
    with torch.no_grad():
        a = adam_ext.info_nce(q, k, bank, 0.2, 0.8)
    b = adam_ext.info_nce(q.clone().requires_grad_(), k, bank, 0.2, 0.8)
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    torch.testing.assert_close(a, adam.info_nce(q, k, bank, 0.2, 0.8), **TOL[torch.float64])


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    """Finite differences vs the analytic backward; the threshold 0.75 keeps a margin > 1e-2 from
    every cosine (checked: planted ~0.93, random ~N(0, 1/64)) so perturbing q by 1e-6 never flips
    the mask."""
    q, k, bank = make(3, 64, 40, dtype=torch.float64, device=device, planted=4, noise=0.05, seed=11)
    s = q @ bank.t()
    assert (s - 0.75).abs().min() > 1e-2 and (s >= 0.75).sum() == 4  # some pruned, none at the edge
    q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: adam_ext.info_nce(a, b, bank, 0.3, 0.75), (q, k))


@pytest.mark.slow
def test_opcheck():
    q, k, bank = make(7, 32, 300, dtype=torch.float64, planted=7, noise=0.05, seed=13)
    # need_pb=False is the no-grad forward: checked without requires_grad (it has no backward)
    torch.library.opcheck(torch.ops.adam.info_nce_fwd, (q, k, bank, 0.2, 0.8, False))
    q.requires_grad_(), k.requires_grad_()
    torch.library.opcheck(torch.ops.adam.info_nce_fwd, (q, k, bank, 0.2, 0.8, True))


def test_torch_compile_fullgraph_traces_the_fake_impl():
    """aot_eager: traces through register_fake and register_autograd without a C++ compile."""
    q, k, bank = make(9, 64, 500, planted=9, seed=17)
    f = torch.compile(lambda a, b: adam_ext.info_nce(a, b, bank, 0.2, 0.8), fullgraph=True, backend="aot_eager")
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    l1, l2 = f(q1, k), adam_ext.info_nce(q2, k, bank, 0.2, 0.8)
    l1.backward(), l2.backward()
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    torch.testing.assert_close(q1.grad, q2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_same_through_both_paths(device):
    """One SGD step of a small projection head with each loss: same loss, same updated weights."""
    torch.manual_seed(19)
    x = torch.randn(24, 32, device=device)
    bank = F.normalize(torch.randn(2000, 16, device=device), dim=1)
    head0 = torch.nn.Linear(32, 16).to(device)
    results = []
    for info_nce in (adam.info_nce, adam_ext.info_nce):
        head = torch.nn.Linear(32, 16).to(device)
        head.load_state_dict(head0.state_dict())
        opt = torch.optim.SGD(head.parameters(), lr=0.5)
        q = F.normalize(head(x), dim=1)
        k = F.normalize(head(x + 0.1), dim=1).detach()
        bank[:24] = F.normalize(q.detach() + 0.01, dim=1)  # near-duplicates to prune
        loss = info_nce(q, k, bank, 0.2, 0.8)
        opt.zero_grad(), loss.backward(), opt.step()
        results.append((loss.detach(), head.weight.detach().clone()))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL[torch.float32])
    torch.testing.assert_close(results[1][1], results[0][1], **GTOL[torch.float32])


def test_bad_inputs_name_the_argument():
    q, k, bank = make(4, 32, 50)
    cases = [
        ((q[0], k, bank, 0.2, 0.8), "q must be 2-D"),
        ((q, k[:3], bank, 0.2, 0.8), "k must have the shape of q"),
        ((q, k, bank[:, :16], 0.2, 0.8), "queue .* D = q.size\\(1\\)"),
        ((q, k, bank.double(), 0.2, 0.8), "queue dtype"),
        ((q.int(), k.int(), bank.int(), 0.2, 0.8), "q must be float32"),
        ((q, k, bank[:, ::1].t().contiguous().t(), 0.2, 0.8), "queue must be contiguous"),
        ((q, k, bank, 0.0, 0.8), "temperature must be finite and > 0"),
        ((q, k, bank, -1.0, 0.8), "temperature must be finite and > 0"),
        ((q, k, bank, 0.2, math.nan), "threshold is NaN"),
        ((q, k, bank[:0], 0.2, 0.8), "K >= 1"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            adam_ext.info_nce(*args)
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="queue is on"):
            adam_ext.info_nce(q, k, bank.cuda(), 0.2, 0.8)


@pytest.mark.parametrize("device", DEVICES)
def test_large_d_and_many_splits(device):
    """D = 512 in float64 needs > 48 KiB of shared memory per CUDA block (the opt-in path); on
    CPU it is one more shape."""
    q, k, bank = make(17, 512, 2100, dtype=torch.float64, device=device, planted=17, seed=23)
    (l0, p0, dq0, _), (l1, p1, dq1, _) = both(q, k, bank, 0.2, 0.8)
    torch.testing.assert_close(l1, l0, **TOL[torch.float64])
    torch.testing.assert_close(dq1, dq0, **GTOL[torch.float64])
    assert p1 == pytest.approx(p0, abs=1e-7) and p1 == pytest.approx(1 / 2100)


def test_build_info():
    info = adam_ext.build_info()
    assert info.startswith("CPU"), info


@pytest.mark.cuda
@needs_cuda
def test_cuda_kernel_choice(monkeypatch):
    """ADAM_INFO_NCE_CUDA_KERNEL: a typo is an error, 'tiled' where it cannot run says why, and
    auto falls back to the simple kernel for a bank not 16-byte aligned (same result)."""
    q, k, bank = make(33, 64, 1500, device="cuda", planted=33, seed=29)
    monkeypatch.setenv("ADAM_INFO_NCE_CUDA_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="must be auto, tc, tiled or simple"):
        adam_ext.info_nce(q, k, bank, 0.2, 0.8)
    monkeypatch.setenv("ADAM_INFO_NCE_CUDA_KERNEL", "tiled")
    with pytest.raises(RuntimeError, match="tiled needs float32 or bfloat16"):
        adam_ext.info_nce(q.double(), k.double(), bank.double(), 0.2, 0.8)
    ref = adam.info_nce(q, k, bank, 0.2, 0.8)
    torch.testing.assert_close(adam_ext.info_nce(q, k, bank, 0.2, 0.8), ref, **TOL[torch.float32])
    monkeypatch.setenv("ADAM_INFO_NCE_CUDA_KERNEL", "auto")
    storage = torch.empty(bank.numel() + 1, device="cuda")
    shifted = storage[1:].view_as(bank)  # 4 bytes past an aligned allocation
    shifted.copy_(bank)
    torch.testing.assert_close(adam_ext.info_nce(q, k, shifted, 0.2, 0.8), ref, **TOL[torch.float32])
    monkeypatch.setenv("ADAM_INFO_NCE_CUDA_KERNEL", "tiled")
    with pytest.raises(RuntimeError, match="aligned"):
        adam_ext.info_nce(q, k, shifted, 0.2, 0.8)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("B,D,K", [(1, 64, 100), (37, 128, 5003), (300, 64, 9001)])
@pytest.mark.parametrize("case", ["none", "planted", "all"])
@pytest.mark.parametrize("kernel", ["auto", "tc"])
def test_tf32_mode_runs_the_tc_kernel(monkeypatch, B, D, K, case, kernel):
    """With TF32 allowed for float32 matmuls, auto takes the TC kernel (TF32 mma.sync); forcing tc
    does too. Against a float64 CPU reference (torch's own matmuls would use TF32 here as well),
    with the bounds test_cuda_emulated.py derives: loss within 2^-10/T (any unit vectors), gradient
    within 2e-3 in norm, and each anchor's lse within 1e-5 of float64 on the TF32-rounded q, bank."""
    monkeypatch.setenv("ADAM_INFO_NCE_CUDA_KERNEL", kernel)
    planted = min(K // 4, 3 * B) if case == "planted" else 0
    q, k, bank = make(B, D, K, device="cuda", planted=planted, seed=B * K + D + 1)
    t = {"none": None, "planted": 0.8, "all": -2.0}[case]
    q64, k64, b64 = (x.double().cpu() for x in (q, k, bank))
    q64.requires_grad_()
    ref, pruned_ref = adam.info_nce(q64, k64, b64, 0.2, t, return_pruned=True)
    dref, = torch.autograd.grad(ref, q64)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        q1 = q.clone().requires_grad_()
        loss, pruned = adam_ext.info_nce(q1, k, bank, 0.2, t, return_pruned=True)
        dq, = torch.autograd.grad(loss, q1)
        _, lse, _, _ = torch.ops.adam.info_nce_fwd(q, k, bank, 0.2, math.inf if t is None else t, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert abs(float(loss.detach()) - float(ref.detach())) <= 2.0**-10 / 0.2
    assert float((dq.double().cpu() - dref).norm()) <= 2e-3 * float(dref.norm()) + 1e-9
    assert float(pruned) == pytest.approx(float(pruned_ref), abs=1e-7)

    torch.testing.assert_close(lse.double().cpu(), tc_lse_reference(q.cpu(), k.cpu(), bank.cpu(), 0.2, t),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", [None, 0.8])
def test_nan_bank_row_propagates_like_the_reference(device, t):
    """A NaN bank entry is not "similar" to anything: the reference keeps it (NaN >= t is false) and
    its loss is NaN; the op must say NaN too, not train on as if the entry had been pruned, and must
    not count it as pruned (with t = None nothing is pruned at all)."""
    q, k, bank = make(11, 64, 500, device=device, planted=11, seed=31)
    bank[250] = math.nan
    (l0, p0, _, _), (l1, p1, _, _) = both(q, k, bank, 0.2, t)
    assert math.isnan(float(l0)) and math.isnan(float(l1))
    assert p1 == pytest.approx(p0, abs=1e-7) and p1 == pytest.approx(0.0 if t is None else 11 / (11 * 500))


def per_anchor_reference(q, k, bank, T, t):
    """adam.info_nce of each anchor alone: the reference's per-anchor loss (it returns the batch mean)."""
    return torch.stack([adam.info_nce(q[i:i + 1], k[i:i + 1], bank, T, t) for i in range(q.shape[0])])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [None, 0.8, -2.0])
@pytest.mark.parametrize("value", [-math.inf, math.inf, math.nan])
def test_non_finite_bank_elements_agree_with_the_reference(device, dtype, t, value):
    """A bank element of -inf, +inf or NaN in three rows (one per chunk of the CPU kernel, so in different splits and
    merged). Each anchor's score with such a row is +-inf (the sign of its q there) or NaN, and the op's loss per
    anchor is the reference's: +inf where a +inf score is kept (t None keeps every entry: the op used to prune it as
    if +inf were a threshold, and said a finite loss), finite where the score is -inf (exp adds 0) or pruned, NaN
    where a NaN is kept. The pruned fraction matches, and so do the gradients: NaN wherever the bank holds a
    non-finite element, in the reference too (its B x K product's backward multiplies 0 by inf)."""
    B, D, K = 6, 64, 9000
    q, k, bank = make(B, D, K, dtype=dtype, device=device, planted=B, seed=41)
    assert (q[:, 0] > 0).any() and (q[:, 0] < 0).any()   # the bad rows give +inf to some anchors, -inf to others
    bank[[100, 4500, 8990], 0] = value
    ref = per_anchor_reference(q, k, bank, 0.2, t)
    loss_i, _, n_pruned, _ = torch.ops.adam.info_nce_fwd(q, k, bank, 0.2, math.inf if t is None else t, False)
    torch.testing.assert_close(loss_i, ref.to(loss_i.dtype), equal_nan=True, **TOL[dtype])
    if value == math.inf and t is None:                  # the case the op got wrong: some +inf, some finite
        assert torch.isinf(ref).any() and torch.isfinite(ref).any()
    (l0, p0, dq0, dk0), (l1, p1, dq1, dk1) = both(q, k, bank, 0.2, t)
    torch.testing.assert_close(l1, l0.to(l1.dtype), equal_nan=True, **TOL[dtype])
    assert p1 == pytest.approx(p0, abs=1e-7) and int(n_pruned.sum()) == round(p0 * B * K)
    torch.testing.assert_close(dq1, dq0, equal_nan=True, **GTOL[dtype])
    torch.testing.assert_close(dk1, dk0, equal_nan=True, **GTOL[dtype])


# Blocks that walk many bank tiles: at the real SM count (the benchmark's shape and a B that is not a
# multiple of the 64-anchor tile; on a 132-SM GPU the tiled and tc blocks walk 8 and 3 tiles), and
# with ADAM_INFO_NCE_CUDA_SMS=2 on a small bank (few blocks, dozens of tiles each, on any GPU). This
# is where the cross-tile rescale of the running sum and the barrier before the next bank tile act.
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("B,D,K,sms", [(256, 128, 65536, 0), (70, 64, 40000, 0), (70, 64, 6000, 2), (130, 128, 9000, 2)])
@pytest.mark.parametrize("kernel", ["simple", "tiled", "tc"])
def test_cuda_blocks_walking_many_bank_tiles(monkeypatch, B, D, K, sms, kernel):
    monkeypatch.setenv("ADAM_INFO_NCE_CUDA_KERNEL", kernel)
    monkeypatch.setenv("ADAM_INFO_NCE_CUDA_SMS", str(sms))
    q, k, bank = make(B, D, K, device="cuda", planted=3 * B, seed=B + K + sms)
    bank = bank[torch.randperm(K, device="cuda")]  # the planted rows spread over tiles and splits
    q64, k64, b64 = (x.double().cpu() for x in (q, k, bank))
    q64.requires_grad_()
    ref, pruned_ref = adam.info_nce(q64, k64, b64, 0.2, 0.8, return_pruned=True)
    dref, = torch.autograd.grad(ref, q64)
    q1 = q.clone().requires_grad_()
    loss, pruned = adam_ext.info_nce(q1, k, bank, 0.2, 0.8, return_pruned=True)
    dq, = torch.autograd.grad(loss, q1)
    with torch.no_grad():
        loss_nograd = adam_ext.info_nce(q, k, bank, 0.2, 0.8)
    dq = dq.double().cpu()
    if kernel == "tc":  # TF32 bounds, derived in test_cuda_emulated.py
        assert abs(float(loss.detach()) - float(ref.detach())) <= 2.0**-10 / 0.2
        assert float((dq - dref).norm()) <= 2e-3 * float(dref.norm())
    else:
        torch.testing.assert_close(loss.detach().double().cpu(), ref.detach(), **TOL[torch.float32])
        torch.testing.assert_close(dq, dref, **GTOL[torch.float32])
    torch.testing.assert_close(loss_nograd, loss.detach(), rtol=0, atol=0)  # need_pb changes nothing else
    assert float(pruned) == pytest.approx(float(pruned_ref), abs=1e-7)
    assert float(pruned) == pytest.approx(3 * B / (B * K), abs=1e-7)


@pytest.mark.cuda
@needs_cuda
def test_cuda_sms_override_is_checked(monkeypatch):
    q, k, bank = make(5, 64, 300, device="cuda", seed=37)
    monkeypatch.setenv("ADAM_INFO_NCE_CUDA_SMS", "two")
    with pytest.raises(RuntimeError, match="ADAM_INFO_NCE_CUDA_SMS must be a count"):
        adam_ext.info_nce(q, k, bank, 0.2, 0.8)
