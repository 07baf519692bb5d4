"""The CUDA kernels of the fused op, run on the CPU through a small CUDA emulator, against the
readable reference adam.info_nce (docs/METHOD.md §4).

Why: CI and most development machines have nvcc but no GPU, so tests/test_fused_op.py's CUDA
variants skip there and a wrong index in csrc/info_nce_kernels.cuh would pass unnoticed until
its first run on a GPU. tests/cuda_emu/emu.h gives the kernels threadIdx/blockIdx, __syncthreads (every
CUDA thread is a fiber, run to its next barrier one after another, so a missing barrier is a
wrong result on every run, not a rare one), warp shuffles and ballots, and the TF32 mma.sync as a
warp-collective built from the PTX ISA's fragment table; info_nce_emu.cpp runs the SIMPLE, TILED
and TC partial kernels and the merge kernel with the launcher's own plan (kernels::plan), on
inputs written by this test. Shared memory starts poisoned with NaN and the output buffers with
NaN / -1, so an element no thread wrote fails the comparison.

What passes here does not prove the kernels right on a GPU (memory model, alignment, bank
conflicts and speed are not emulated): gpu_check.sh runs tests/test_fused_op.py on CUDA and
compute-sanitizer for that. It does prove the arithmetic, the tiling, the split/merge and the
barrier placement the emulation can see.

Tolerances as in test_fused_op.py: float32 kernels against a float64 reference on the same values
(bf16 inputs are upcast exactly, so they get the float32 tolerance too): rtol 1e-5 on the loss,
atol 1e-6 + rtol 1e-4 on the gradient, which is rebuilt from the kernel's per-anchor outputs as
dL/dq_i = ((exp(-loss_i) - 1) k_i + pb_i) / (T B), the formula adam_ext/ops.py uses. float64 (the
simple kernel): 1e-10. Pruning counts exactly (no cosine is within rounding of t).
"""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import adam
from helpers import loss_inputs, tc_lse_reference

pytestmark = pytest.mark.slow  # compiles the emulator, then runs each kernel as fibers
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "cuda_emu", "info_nce_emu.cpp")
T = 0.2
TOL = {"f32": dict(rtol=1e-5, atol=1e-6), "bf16": dict(rtol=1e-5, atol=1e-6), "f64": dict(rtol=1e-10, atol=1e-12)}
# The TC kernel rounds q, bank rows and P to TF32 (11 significant bits, 2^-11 = 4.9e-4 relative)
# and accumulates in fp32. Two checks: (1) against adam.info_nce on the unrounded inputs with a
# bound that holds for any unit vectors - each score moves by at most 2^-10 (two roundings,
# Cauchy-Schwarz), each logit by 2^-10/T, and a log-sum-exp by no more than its largest input -
# plus the gradient within 2e-3 in norm (P's rounding; a TF32 matrix product typically lands
# near 3e-4 relative error, so 2e-3 leaves a margin of ~7x); (2) tight: its per-anchor lse against float64 on the same TF32-rounded q and bank, the
# positive logit from the unrounded q and k as the merge kernel computes it: rtol 1e-5.
TC_LOSS_ATOL, TC_GRAD_RTOL = 2.0**-10 / T, 2e-3

GTOL = {"f32": dict(rtol=1e-4, atol=1e-6), "bf16": dict(rtol=1e-4, atol=1e-6), "f64": dict(rtol=1e-10, atol=1e-12)}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f64": torch.float64}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the CUDA emulator")
    exe = str(tmp_path_factory.mktemp("emu") / "info_nce_emu")
    r = subprocess.run(CXX_FLAGS(cxx) + [SRC, "-o", exe], capture_output=True, text=True)
    if r.returncode and "ucontext.h" in r.stderr:
        pytest.skip(f"no <ucontext.h> (the emulator's fibers need glibc): {r.stderr.strip().splitlines()[0]}")
    assert r.returncode == 0, f"building {SRC} failed:\n{r.stderr[-3000:]}"
    return exe


def CXX_FLAGS(cxx):
    # -U_FORTIFY_SOURCE: the fortified longjmp refuses to jump to another stack, which fibers do.
    return [cxx, "-std=c++17", "-O2", "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas"]


def make(B, D, K, case, seed):
    """Unit-norm q, k, bank (float64). planted: a few bank rows are near-copies of anchors
    (cosine ~0.98, pruned at t = 0.8), the rest random (cosine ~N(0, 1/D), kept)."""
    q, k, bank = loss_inputs(B, D, K, planted=min(K, 3 * B) if case == "planted" else 0, seed=seed, spread=True)
    t = {"none": float("inf"), "planted": 0.8, "all": -2.0}[case]
    return q, k, bank, t


def run_emu(exe, tmp_path, kernel, dtype, q, k, bank, t, need_pb=True, sms=4, order="forward"):
    B, D = q.shape
    K = bank.shape[0]
    for name, x in (("q", q), ("k", k), ("bank", bank)):
        x.contiguous().view(-1).view(torch.uint8).numpy().tofile(tmp_path / f"{name}.bin")
    cmd = [exe, kernel, dtype, str(B), str(D), str(K), repr(T), repr(t), str(int(need_pb)), str(sms), str(tmp_path)]
    # order: the fibers run thread 0 first in each phase, or the last thread first ("reverse").
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, ADAM_EMU_ORDER=order))
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}"
    out = dict(loss=np.fromfile(tmp_path / "loss.bin"), lse=np.fromfile(tmp_path / "lse.bin"),
               n_pruned=np.fromfile(tmp_path / "n_pruned.bin", dtype=np.int64),
               pb=np.fromfile(tmp_path / "pb.bin").reshape(B, D if need_pb else 0), plan=r.stdout.strip())
    return {key: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for key, v in out.items()}


def check_against_reference(out, q, k, bank, t, dtype, need_pb=True, tf32=False):
    """q, k, bank: the exact values the kernel saw, in float64. tf32: the TC kernel's tolerances."""
    qq = q.clone().requires_grad_()
    loss_ref, pruned_ref = adam.info_nce(qq, k, bank, T, None if t == float("inf") else t, return_pruned=True)
    (dq_ref,) = torch.autograd.grad(loss_ref, qq)
    B, K = q.shape[0], bank.shape[0]
    assert torch.isfinite(out["loss"]).all() and torch.isfinite(out["lse"]).all(), out["plan"]
    if tf32:
        assert abs(out["loss"].mean() - loss_ref.detach()) <= TC_LOSS_ATOL, out["plan"]
        torch.testing.assert_close(out["lse"], tc_lse_reference(q, k, bank, T, t), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out["loss"].mean(), loss_ref.detach(), **TOL[dtype])
    torch.testing.assert_close(out["n_pruned"], ((q @ bank.T) >= t).sum(1), rtol=0, atol=0)
    assert out["n_pruned"].sum().item() / (B * K) == pytest.approx(float(pruned_ref), rel=1e-6)  # the reference returns it in float32
    if need_pb:
        dq = ((torch.exp(-out["loss"]) - 1)[:, None] * k + out["pb"]) / (T * B)
        if tf32:
            assert (dq - dq_ref).norm() <= TC_GRAD_RTOL * dq_ref.norm(), float((dq - dq_ref).norm() / dq_ref.norm())
        else:
            torch.testing.assert_close(dq, dq_ref, **GTOL[dtype])


# (B, D, K, sms): B = 1; B not a multiple of 64 or 16; K not a multiple of 64; sms = 1 gives one
# split with many tiles per block, larger sms many splits (some of a single, partial tile).
# The tc kernel takes D in {64, 128} (D = 256 runs the tiled one).
FAST_SHAPES = [(1, 64, 777, 4), (70, 128, 1000, 3), (130, 256, 300, 8), (64, 128, 2100, 1), (17, 64, 2000, 64),
               (256, 128, 5000, 132),   # the H100/H200 plan (132 SMs) at the benchmark's B and D
               (70, 64, 40000, 132)]    # 132 SMs and a bank large enough that each block walks 2-3 tiles
FAST_CASES = [(kernel, *shape) for kernel in ("tiled", "tc") for shape in FAST_SHAPES if kernel == "tiled" or shape[1] <= 128]


@pytest.mark.parametrize("kernel,B,D,K,sms", FAST_CASES)
@pytest.mark.parametrize("case", ["none", "planted", "all"])
def test_fast_kernels_match_reference(emu, tmp_path, kernel, B, D, K, sms, case):
    q, k, bank, t = make(B, D, K, case, seed=B + D + K)
    out = run_emu(emu, tmp_path, kernel, "f32", q.float(), k.float(), bank.float(), t, sms=sms)
    check_against_reference(out, q.float().double(), k.float().double(), bank.float().double(), t, "f32",
                            tf32=kernel == "tc")


@pytest.mark.parametrize("kernel", ["tiled", "tc", "simple"])
def test_bf16_inputs_accumulate_in_fp32(emu, tmp_path, kernel):
    q, k, bank, t = make(45, 128, 700, "planted", seed=3)
    qb, kb, bb = (x.to(torch.bfloat16) for x in (q, k, bank))
    out = run_emu(emu, tmp_path, kernel, "bf16", qb, kb, bb, t)
    check_against_reference(out, qb.double(), kb.double(), bb.double(), t, "bf16", tf32=kernel == "tc")


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("B,D,K,sms", [(1, 64, 100, 4), (37, 128, 303, 2), (13, 100, 250, 8)])
def test_simple_kernel_matches_reference(emu, tmp_path, dtype, B, D, K, sms):
    q, k, bank, t = make(B, D, K, "planted", seed=B * K)
    x = [v.to(DTYPES[dtype]) for v in (q, k, bank)]
    out = run_emu(emu, tmp_path, "simple", dtype, *x, t, sms=sms)
    check_against_reference(out, *(v.double() for v in x), t, dtype)


@pytest.mark.parametrize("kernel", ["tiled", "tc", "simple"])
def test_no_pb_path_and_same_bits_in_any_thread_order(emu, tmp_path, kernel):
    """need_pb = False skips the P B accumulation but not the loss; and the outputs do not depend
    on the order in which the threads run (no atomics anywhere: a difference would be a race)."""
    q, k, bank, t = make(50, 64, 400, "planted", seed=7)
    x = [v.float() for v in (q, k, bank)]
    out = run_emu(emu, tmp_path, kernel, "f32", *x, t, need_pb=False)
    check_against_reference(out, *(v.double() for v in x), t, "f32", need_pb=False, tf32=kernel == "tc")
    a = run_emu(emu, tmp_path, kernel, "f32", *x, t)
    b = run_emu(emu, tmp_path, kernel, "f32", *x, t, order="reverse")
    check_against_reference(b, *(v.double() for v in x), t, "f32", tf32=kernel == "tc")
    assert torch.equal(a["loss"], out["loss"]) and torch.equal(a["loss"], b["loss"]) and torch.equal(a["pb"], b["pb"])


@pytest.mark.parametrize("kernel,dtype", [("simple", "f64"), ("simple", "f32"), ("tiled", "f32"), ("tc", "f32")])
@pytest.mark.parametrize("t", [float("inf"), 0.8])
@pytest.mark.parametrize("value", [-float("inf"), float("inf"), float("nan")])
def test_non_finite_bank_elements_agree_with_the_reference(emu, tmp_path, kernel, dtype, t, value):
    """As tests/test_fused_op.py on the CPU kernel: one element of three bank rows (in different splits: sms = 3)
    is -inf, +inf or NaN; each anchor's loss is the reference's, +inf, NaN or finite alike (t = inf: nothing
    pruned, a +inf score kept), and the pruned counts are the reference's rule (s >= t, t finite; NaN never)."""
    q, k, bank, _ = make(40, 64, 1000, "planted", seed=43)
    x = [v.to(DTYPES[dtype]) for v in (q, k, bank)]
    assert (x[0][:, 0] > 0).any() and (x[0][:, 0] < 0).any()   # +inf scores for some anchors, -inf for others
    x[2][[3, 500, 997], 0] = value
    out = run_emu(emu, tmp_path, kernel, dtype, *x, t, sms=3)
    q64, k64, b64 = (v.double() for v in x)
    ref = torch.stack([adam.info_nce(q64[i:i + 1], k64[i:i + 1], b64, T, None if t == float("inf") else t)
                       for i in range(q64.shape[0])])
    assert torch.equal(torch.isnan(out["loss"]), torch.isnan(ref)), out["plan"]
    assert torch.equal(torch.isposinf(out["loss"]), torch.isposinf(ref)), out["plan"]
    fin = torch.isfinite(ref)
    assert fin.any() or value != -float("inf")
    if kernel == "tc":
        assert (out["loss"][fin] - ref[fin]).abs().max() <= TC_LOSS_ATOL if fin.any() else True
    else:
        torch.testing.assert_close(out["loss"][fin], ref[fin], **TOL[dtype])
    s = q64 @ b64.T
    torch.testing.assert_close(out["n_pruned"], ((s >= t) & (t != float("inf"))).sum(1), rtol=0, atol=0)


# Bugs the emulation must catch: (kernel, what is planted, line in info_nce_kernels.cuh, replacement).
PLANTED_BUGS = [
    ("tiled", "a bank row per tile dropped from the scores",
     "valid[c] = jt + tx + TX * c < j_end;", "valid[c] = jt + tx + TX * c < j_end && tx + c != 5;"),
    ("tc", "the mma A fragment's a1 and a2 swapped (a wrong reading of the PTX layout)",
     "const float a[4] = {qs[ra * P + k0 + c], qs[(ra + 8) * P + k0 + c], qs[ra * P + k0 + c + 4],",
     "const float a[4] = {qs[ra * P + k0 + c], qs[ra * P + k0 + c + 4], qs[(ra + 8) * P + k0 + c],"),
    ("tiled", "no barrier between writing the P tile and reading it (read-after-write race)",
     "      __syncthreads();  // the whole P tile is written\n", ""),
    ("tiled", "no barrier before the next bank tile overwrites the current one (write-after-read race)",
     "    __syncthreads();  // all reads of the previous bs and ps are done (and qs is complete)\n", ""),
    ("tc", "no __syncwarp between a warp's P rows and their use as the mma A operand",
     "      __syncwarp();  // P_w's rows are written and read by this warp only\n", ""),
    ("tiled", "a __syncthreads in divergent code (deadlock)",
     "      __syncthreads();  // the whole P tile is written\n", "      if (tx == 0) __syncthreads();\n"),
]


_bad_builds = {}  # planted bug -> emulator built with it (each built once for both thread orders)


@pytest.mark.parametrize("kernel,what,needle,bug", PLANTED_BUGS, ids=[b[1].split(" (")[0] for b in PLANTED_BUGS])
@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_emulator_catches_a_planted_bug(emu, tmp_path_factory, tmp_path, kernel, what, needle, bug, order):
    """The emulation can fail: each planted bug must make the kernel disagree with the reference
    (or stop with a deadlock report), whichever thread runs first."""
    if what not in _bad_builds:
        src = open(os.path.join(HERE, "..", "csrc", "info_nce_kernels.cuh")).read()
        assert src.count(needle) == 1, f"the planted bug's anchor line moved; update this test: {needle!r}"
        bad_dir = tmp_path_factory.mktemp("bad")
        (bad_dir / "csrc").mkdir(parents=True)
        (bad_dir / "tests" / "cuda_emu").mkdir(parents=True)
        (bad_dir / "csrc" / "info_nce_kernels.cuh").write_text(src.replace(needle, bug))
        shutil.copy(os.path.join(HERE, "..", "csrc", "online_lse.h"), bad_dir / "csrc" / "online_lse.h")
        for f in ("emu.h", "info_nce_emu.cpp"):
            shutil.copy(os.path.join(HERE, "cuda_emu", f), bad_dir / "tests" / "cuda_emu" / f)
        exe = str(bad_dir / "bad_emu")
        r = subprocess.run(CXX_FLAGS(shutil.which("g++") or "c++") + [str(bad_dir / "tests" / "cuda_emu" / "info_nce_emu.cpp"),
                           "-o", exe], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        _bad_builds[what] = exe
    exe = _bad_builds[what]
    q, k, bank, t = make(70, 64 if kernel == "tiled" else 128, 1000, "none", seed=1)
    x = [v.float() for v in (q, k, bank)]
    with pytest.raises(AssertionError, match="deadlock" if "deadlock" in what else None):
        out = run_emu(exe, tmp_path, kernel, "f32", *x, t, sms=3, order=order)
        check_against_reference(out, *(v.double() for v in x), t, "f32", tf32=kernel == "tc")
