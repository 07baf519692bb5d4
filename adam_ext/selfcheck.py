"""The fused op checked against the readable reference on the device it is about to run on.

A kernel that has never met this GPU (or this compiler, or this CPU) should not be trusted with a
days-long run on its word. So before training uses the fused op on a device, `choose_path` runs
`self_check`: small random inputs that reach every kernel the launcher can pick there (CPU: the
one CPU kernel in float32 and float64; CUDA: SIMPLE, TILED at each D it serves, TC at each D it
serves), with pruning on, the gradient term on and off, against the reference in float64 on the
same input values. About 0.1 s on a 2-core CPU, milliseconds on a GPU, once per process and device.

`python bench.py selfcheck --device cuda --scale full` is the smoke test of a GPU machine
(gpu_check.sh): every kernel and dtype variant, shapes whose blocks walk many bank tiles, the
misaligned-bank fallback, a NaN bank row; torch.profiler records which kernel really ran.

Tolerances (the fused op against the float64 reference on the op's own input values):
  float32 kernels (CPU, SIMPLE, TILED): the same fp32 products and log-sum-exps in another order
      (blocked GEMMs, an online split log-sum-exp), so a few ulp of the largest terms: loss within
      1e-5 relative, gradients within 1e-4 relative + 1e-6 absolute (entries ~1e-2).
  bf16/fp16 inputs: upcast exactly to fp32 by the op, so the fp32 tolerance on the upcast values,
      except the returned gradient, which is rounded to the input dtype: 1e-2 relative (8 bits).
  float64 (CPU, SIMPLE): 1e-10.
  TC (TF32 tensor cores): q, bank rows and P rounded to 11 significant bits. Each score moves by
      at most 2^-10 for unit vectors (two roundings, Cauchy-Schwarz), so each logit by 2^-10/T and
      the loss, a log-sum-exp minus the positive logit, by no more than that: |dloss| <= 2^-10/T.
      Gradient within 2e-3 in norm (a TF32 product lands near 3e-4 relative; 2e-3 leaves ~7x), plus
      2^-8 for bf16/fp16 inputs, whose gradient comes back rounded to the input dtype (bf16's own
      rounding alone is up to 2^-9 = 2.0e-3 relative: measured 1.7e-3 on an H200).
  Pruning counts: exact (planted duplicates sit at cosine ~0.97, far above t = 0.8; random rows
      at ~N(0, 1/D), far below), so a kernel that prunes the wrong entries fails at once.
"""
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import ops

T, THRESHOLD = 0.2, 0.8  # the paper's temperature and pruning threshold
KERNEL_VAR, SMS_VAR = "ADAM_INFO_NCE_CUDA_KERNEL", "ADAM_INFO_NCE_CUDA_SMS"
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}
TC_LOSS_ATOL, TC_GRAD_RTOL = 2.0**-10 / T, 2e-3


class FusedOpError(ValueError):
    """The fused op disagrees with the reference, or cannot run where it was asked to."""


@dataclass
class Case:
    kernel: str          # what must run: cpu | simple | tiled | tc
    dtype: str           # f32 | f64 | bf16 | f16
    B: int
    D: int
    K: int
    threshold: float = THRESHOLD  # math.inf: no pruning; -2: everything pruned (only the positive left)
    grad: bool = True    # False: the no-grad forward (need_pb = False), loss only
    force: str = ""      # ADAM_INFO_NCE_CUDA_KERNEL for this case ("" = auto)
    tf32: bool = False   # torch.backends.cuda.matmul.allow_tf32 during the call (auto -> tc for f32)
    sms: int = 0         # ADAM_INFO_NCE_CUDA_SMS (0 = the real count): small -> blocks walk many tiles
    misaligned: bool = False  # bank 4 bytes past an aligned address: auto must fall back to simple
    nan_row: bool = False     # one bank row of NaN: the loss must be NaN, as the reference's

    @property
    def name(self):
        extra = [f"t={self.threshold:g}", "grad" if self.grad else "no-grad"]
        extra += [f"force={self.force}"] * bool(self.force) + ["tf32"] * self.tf32 + [f"sms={self.sms}"] * bool(self.sms)
        extra += ["misaligned"] * self.misaligned + ["nan-row"] * self.nan_row
        return f"{self.kernel} {self.dtype} B={self.B} D={self.D} K={self.K} " + " ".join(extra)


def cases(device, scale="quick"):
    """The inputs that reach every kernel the launcher can pick on `device`.
    quick: one small case per kernel and D (the start-of-training check).
    sanitize: one multi-tile case per kernel and D, small enough for racecheck.
    small: every variant at small shapes (memcheck), many tiles per block via sms.
    full: every variant, plus the real-size multi-tile shapes of the benchmark."""
    if device.type == "cpu":
        out = [Case("cpu", "f32", 37, 128, 5003), Case("cpu", "f64", 5, 64, 300),
               Case("cpu", "f32", 9, 64, 700, grad=False)]
        if scale != "quick":
            out += [Case("cpu", "bf16", 21, 128, 3001), Case("cpu", "f16", 21, 128, 3001),
                    Case("cpu", "f32", 13, 256, 777, threshold=math.inf), Case("cpu", "f32", 7, 64, 300, threshold=-2.0),
                    Case("cpu", "f32", 11, 64, 500, nan_row=True), Case("cpu", "f32", 300, 64, 9001)]
        return out
    major = torch.cuda.get_device_capability(device)[0]
    tc = ["tc"] if major >= 8 else []
    out = [Case("simple", "f32", 37, 128, 3001, force="simple"), Case("simple", "f64", 5, 64, 300),
           Case("simple", "f32", 9, 100, 500)]                            # other D: auto -> simple
    out += [Case("tiled", "f32", 33, D, 2000, force="tiled") for D in (64, 128, 256)]
    out += [Case("tc", "f32", 33, D, 2000, force="tc") for D in (64, 128) if tc]
    out += [Case("tc", "bf16", 33, 128, 2000)] if tc else []              # bf16: auto -> tc
    out += [Case("tiled", "f32", 33, 128, 2000, grad=False, force="tiled")]
    if scale == "quick":
        return out
    if scale == "sanitize":  # one multi-tile case per kernel (racecheck tracks every shared-memory access)
        return [Case(kern, "f32", 70, D, 1500, force=kern, sms=2) for kern in ["simple", "tiled"] + tc for D in (64, 128)] + \
               [Case("tiled", "f32", 70, 256, 1500, force="tiled", sms=2), Case("simple", "f64", 9, 64, 700, sms=2),
                Case("simple", "f32", 33, 128, 700, misaligned=True), Case("tiled", "f32", 33, 64, 700, force="tiled", grad=False)]
    sms = 2 if scale == "small" else 0  # small: few blocks, so each walks many bank tiles
    big = [(70, 64, 6000), (130, 128, 9000)] if scale == "small" else [(70, 64, 40000), (256, 128, 65536)]
    out += [Case("simple", dt, 21, 128, 3001, force="simple") for dt in ("bf16", "f16")]
    out += [Case("tiled", "f32", 33, 128, 2000)]                          # f32 at "highest": auto -> tiled
    out += [Case("tiled", "bf16", 33, 128, 2000, force="tiled")]
    out += [Case("tc", "f32", 33, D, 2000, tf32=True) for D in (64, 128) if tc]  # TF32 allowed: auto -> tc
    out += [Case("tc", "bf16", 33, 64, 2000)] if tc else []
    out += [Case("simple", "f32", 33, 128, 2000, misaligned=True)]        # auto falls back to simple
    out += [Case(kern, "f32", 11, 64, 500, force=kern, nan_row=True) for kern in ["simple", "tiled"] + tc]
    out += [Case(kern, "f32", 7, 64, 300, force=kern, threshold=thr) for kern in ["simple", "tiled"] + tc
            for thr in (math.inf, -2.0)]
    for B, D, K in big:
        for kern in ["tiled"] + tc + ["simple"]:
            for grad in (True, False):
                out.append(Case(kern, "f32", B, D, K, force=kern, grad=grad, sms=sms))
    return out


def make_inputs(case, device, generator):
    """Unit-norm q, k (B x D), bank (K x D) in float64 on the CPU: a few bank rows are near-copies of
    anchors (cosine ~0.97 at D = 128, pruned at t = 0.8), the rest random (kept)."""
    B, D, K = case.B, case.D, case.K
    q = F.normalize(torch.randn(B, D, generator=generator, dtype=torch.float64), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(B, D, generator=generator, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(K, D, generator=generator, dtype=torch.float64), dim=1)
    n = min(K // 4, 3 * B)
    idx = torch.randperm(K, generator=generator)[:n]  # spread over tiles and splits
    bank[idx] = F.normalize(q[torch.arange(n) % B] + 0.02 * torch.randn(n, D, generator=generator, dtype=torch.float64), dim=1)
    if case.nan_row:
        bank[K // 2] = math.nan
    dt = DTYPES[case.dtype]
    return [x.to(dt) for x in (q, k, bank)]


@contextlib.contextmanager
def launcher_settings(case):
    """The case's kernel choice, SM count and TF32 setting for the duration of one call."""
    saved = {v: os.environ.get(v) for v in (KERNEL_VAR, SMS_VAR)}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    os.environ[KERNEL_VAR] = case.force or "auto"
    os.environ[SMS_VAR] = str(case.sms)
    torch.backends.cuda.matmul.allow_tf32 = case.tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


def kernels_in(prof):
    """Which partial kernel(s) a torch.profiler trace shows: simple, tiled, tc (cpu: the CPU op)."""
    names = {e.name for e in prof.events()}
    found = set()
    for name in names:
        if "info_nce_partial_tiled_kernel" in name:
            found.add("tiled")
        elif "info_nce_partial_tc_kernel" in name:
            found.add("tc")
        elif "info_nce_partial_kernel" in name:
            found.add("simple")
    return sorted(found)


def run_case(case, device, op, reference, generator, profile=False):
    """One comparison. Returns a dict: the case, errors, what ran, ok, and a one-line message."""
    q, k, bank = make_inputs(case, device, generator)
    # The reference on the op's own input values, in float64 on the CPU (no TF32 there).
    q64, k64, b64 = (x.double() for x in (q, k, bank))
    q64.requires_grad_(case.grad)
    t_ref = None if math.isinf(case.threshold) else case.threshold
    ref, pruned_ref = reference(q64, k64, b64, T, t_ref, return_pruned=True)
    dref = torch.autograd.grad(ref, q64)[0] if case.grad else None

    qd, kd = q.to(device), k.to(device)
    if case.misaligned:  # the same values 4 bytes past an aligned allocation
        storage = torch.empty(bank.numel() + 1, dtype=bank.dtype, device=device)
        bd = storage[1:].view_as(bank)
        bd.copy_(bank)
    else:
        bd = bank.to(device)
    ran = [case.kernel] if device.type == "cpu" else []
    prof_ctx = contextlib.nullcontext()
    if profile and device.type == "cuda":
        prof_ctx = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    with launcher_settings(case), prof_ctx as prof:
        q1 = qd.clone().requires_grad_(case.grad)
        with torch.set_grad_enabled(case.grad):
            loss, pruned = op(q1, kd, bd, T, t_ref, return_pruned=True)
            dq = torch.autograd.grad(loss, q1)[0] if case.grad else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if prof is not None:
        ran = kernels_in(prof)

    loss, ref = float(loss.detach()), float(ref.detach())
    r = dict(case=case.name, **asdict(case), ran=",".join(ran) or "?", loss=loss, loss_ref=ref,
             pruned=float(pruned), pruned_ref=float(pruned_ref))
    problems = []
    if case.nan_row:
        if not math.isnan(loss) or not math.isnan(ref):
            problems.append(f"a NaN bank row gave loss {loss} (reference {ref}); both must be NaN")
    else:
        tc = case.kernel == "tc"
        lerr = abs(loss - ref)
        ltol = TC_LOSS_ATOL if tc else (1e-10 if case.dtype == "f64" else 1e-5) * max(1.0, abs(ref))
        r["loss_err"], r["loss_tol"] = lerr, ltol
        if not lerr <= ltol:  # `not <=` so that NaN fails
            problems.append(f"loss {loss:.8g} vs reference {ref:.8g} (error {lerr:.3g} > {ltol:.3g})")
        if case.grad:
            dq = dq.double().cpu()
            if tc:
                gerr = float((dq - dref).norm() / max(float(dref.norm()), 1e-12))  # all pruned: both 0
                gtol = TC_GRAD_RTOL + (2.0**-8 if case.dtype in ("bf16", "f16") else 0.0)
                gok = gerr <= gtol
            else:
                rtol = {"f64": 1e-10, "bf16": 1e-2, "f16": 1e-2}.get(case.dtype, 1e-4)
                atol = 1e-12 if case.dtype == "f64" else 1e-6
                excess = (dq - dref).abs() - rtol * dref.abs()
                gerr, gtol = float((excess.max())), atol
                gok = bool(torch.isfinite(dq).all()) and gerr <= atol
            r["grad_err"], r["grad_tol"] = gerr, gtol
            if not gok:
                problems.append(f"dL/dq off by {gerr:.3g} (tolerance {gtol:.3g})")
        if abs(float(pruned) - float(pruned_ref)) > 1e-7:
            problems.append(f"pruned fraction {float(pruned):.6g} vs reference {float(pruned_ref):.6g}")
    if device.type == "cuda" and profile and ran != [case.kernel]:
        problems.append(f"expected the {case.kernel} kernel, the profiler saw {ran or 'none'}")
    r["ok"] = not problems
    r["message"] = "; ".join(problems)
    return r


_checked = {}  # (device, op) -> list of results, so each device is checked once per process


def self_check(device, reference, scale="quick", op=None, seed=None, profile=False, force=False):
    """Compare the fused op with `reference` (adam.info_nce) on `device`; returns the list of results
    (dicts with "ok" and "message"). Cached per device for scale "quick" unless force=True.
    Fresh random inputs every time (seed from os.urandom unless given; it is in each result)."""
    device = torch.device(device)
    op = op or ops.info_nce
    key = (str(device), op)
    if scale == "quick" and not force and key in _checked:
        return _checked[key]
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    generator = torch.Generator().manual_seed(seed)
    results = []
    for case in cases(device, scale):
        try:
            r = run_case(case, device, op, reference, generator, profile=profile)
        except RuntimeError as e:
            if case.force and "needs" in str(e):  # this GPU cannot run the kernel: auto never picks it
                r = dict(case=case.name, **asdict(case), ok=True, skipped=True, message=str(e).splitlines()[0])
            else:
                r = dict(case=case.name, **asdict(case), ok=False, message=f"raised {str(e).splitlines()[0]}")
        r["seed"] = seed
        results.append(r)
    if scale == "quick":
        _checked[key] = results
    return results


def failure_line(results):
    bad = [r for r in results if not r["ok"]]
    if not bad:
        return ""
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    r = bad[0]
    return f"kernel {r['kernel']}, {r['dtype']} B={r['B']} D={r['D']} K={r['K']}: {r['message']}{more} [seed {r['seed']}]"


def choose_path(flag, device, reference, say=print, op=None):
    """--loss auto|fused|torch -> the loss function to train with: op (default: the fused adam_ext.info_nce) or
    reference (adam.info_nce, passed in by the caller). Says which path runs and why.

    fused: the op must be built for the device and pass the self-check, else FusedOpError.
    auto:  the op when it is built for the device and passes; otherwise the reference, with a
           loud WARNING when the op is built but wrong here. torch: the reference."""
    op = op or ops.info_nce
    device = torch.device(device)
    if flag == "torch":
        say("loss: pure-PyTorch reference (asked for)")
        return reference
    info = ops.build_info()
    on_device = ops.is_built() and (device.type != "cuda" or "CUDA" in info)
    if not on_device:
        if flag == "fused":
            raise FusedOpError(f"--loss fused: the op is not built for {device.type} ({info}); build it with "
                               "`pip install --no-build-isolation -e .` or use --loss torch")
        say(f"loss: pure-PyTorch reference (auto, adam_ext: {info})")
        return reference
    t0 = time.perf_counter()
    results = self_check(device, reference, op=op)
    took = time.perf_counter() - t0
    bad = failure_line(results)
    if bad and flag == "fused":
        raise FusedOpError(f"--loss fused: the fused op disagrees with adam.info_nce on {device}: {bad}. "
                           "Train with --loss torch and report this with the output of "
                           f"`python bench.py selfcheck --device {device.type} --scale full`")
    if bad:
        say(f"WARNING: the fused op disagrees with adam.info_nce on {device}: {bad}. "
            "Training with the pure-PyTorch reference instead (same loss, more memory and time).")
        return reference
    n = sum(not r.get("skipped") for r in results)
    say(f"loss: fused adam_ext op ({flag}; {info}; self-check on {device}: {n} kernel cases match "
        f"adam.info_nce, {took * 1000:.0f} ms)")
    return op


def fmt_markdown(results, device_name):
    rows = ["| case | ran | loss error (tol) | grad error (tol) | pruned | result |", "|---|---|---|---|---|---|"]
    for r in results:
        le = f"{r['loss_err']:.2g} ({r['loss_tol']:.2g})" if "loss_err" in r else "-"
        ge = f"{r['grad_err']:.2g} ({r['grad_tol']:.2g})" if "grad_err" in r else "-"
        pr = f"{100 * r['pruned']:.3f}%" if "pruned" in r else "-"
        res = "skipped: " + r["message"] if r.get("skipped") else ("ok" if r["ok"] else "FAIL: " + r["message"])
        rows.append(f"| {r['case']} | {r.get('ran', '-')} | {le} | {ge} | {pr} | {res} |")
    n_ok = sum(r["ok"] and not r.get("skipped") for r in results)
    return f"Self-check on {device_name}: {n_ok}/{len(results)} cases pass.\n\n" + "\n".join(rows) + "\n"
