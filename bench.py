"""Benchmarks: the pruned InfoNCE loss (docs/METHOD.md §4, §6) three ways, and adam.py's input pipeline.

  python bench.py [flags]                   the loss paths below, as a table (BENCHMARKS.md)
  python bench.py pipeline [adam.py flags]  images/s of the input pipeline alone (see pipeline())
  python bench.py selfcheck [--device cuda] the fused op against adam.info_nce, every kernel (see selfcheck())

The loss, three ways to compute the same number:
  torch  - adam.info_nce, the readable pure-PyTorch reference (builds B x K matrices)
  loop   - loop_info_nce, the brute-force reference of the tests and the authors' formulation
           re-expressed for the record: a Python loop over anchors, one pruned log-softmax each.
           At big shapes only --loop-anchors anchors are timed and the time is extrapolated
           linearly to B (the loop is embarrassingly linear in B); the table marks such rows with "~".
  fused  - adam_ext.info_nce, the fused op (csrc/): one pass over the bank, no B x K buffer. On
           CUDA the launcher picks its kernel (TILED for fp32/bf16 at D in {64, 128, 256})
  fused_simple - CUDA only: the same op with the readable SIMPLE kernel forced
           (ADAM_INFO_NCE_CUDA_KERNEL=simple), to show what the tiling buys
  fused_tc, torch_tf32 - CUDA only: the op on tensor cores (TC kernel, TF32) and the reference with
           TF32 matmuls (torch.backends.cuda.matmul.allow_tf32), the pair at the "high" precision
           setting; for bf16 inputs `fused` already runs the TC kernel

Measured: forward (under no_grad), forward+backward (grad w.r.t. q), peak extra memory of one
forward+backward call, and on CUDA the achieved bandwidth (one read of the bank) and TFLOP/s
(2 B K D for the scores, twice that when the backward's sum_j p_ij b_j is accumulated) next to
a floor measured on the same device (bank bytes / clone bandwidth, flops / torch.mm throughput).

Timing: CPU wall clock (perf_counter) median of --repeats after one warm-up; CUDA events, median
after warm-up, the bank rotated among copies larger than L2 in total so it is read from HBM.
Peak extra memory (torch and fused paths): CUDA max_memory_allocated minus what the inputs hold; CPU: the rise of the
process's peak RSS during one call, each (path, shape) in a fresh
subprocess after a small warm-up call (VmHWM of /proc/self/status, reset just before the call) -
it counts what the allocator really touched, library workspaces included; a few MiB are noise.

  python bench.py --quick                          # default shape only, CPU
  python bench.py --device cuda --md BENCHMARKS_cuda.md
  python bench.py --sweep --md /tmp/bench_cpu.md   # K up to 1,048,576 and B in {64, 256, 1024}
  python bench.py pipeline --data chestxray14 --batches 20 --gpu-views   # images/s of the views on the GPU
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import adam
import adam_ext
from adam_cxr import runs

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
g = parser.add_argument_group("what to run")
g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (cuda needs a GPU and a CUDA build)")
g.add_argument("--shape", default="256,128,65536", help="B,D,K of the main row (B anchors, D dims, K bank entries)")
g.add_argument("--sweep", action="store_true", help="also K in {16384, 262144, 1048576} at B=256 and B in {64, 1024} at K=65536")
g.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16: inputs in bf16; the op accumulates in fp32)")
g.add_argument("--paths", default="torch,loop,fused", help="comma list of torch, loop, fused; CUDA only: fused_simple, fused_tc, torch_tf32")
g.add_argument("--quick", action="store_true", help="main shape, fp32 only, 3 repeats: a smoke run of a minute on CPU")
g = parser.add_argument_group("measurement")
g.add_argument("--threads", type=int, default=0, help="torch.set_num_threads for the CPU (0: leave torch's default); "
               "on a shared, oversubscribed machine 1 thread gives the stable numbers")
g.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported); CUDA uses 5x this")
g.add_argument("--loop-anchors", type=int, default=8, help="anchors timed for the loop path when B is larger (extrapolated)")
g.add_argument("--max-ref-gib", type=float, default=4.0, help="skip the torch path when its B x K matrices would exceed this")
g.add_argument("--no-mem", action="store_true", help="skip the (slow on CPU: one subprocess per row) memory measurement")
g.add_argument("--temperature", type=float, default=0.2, help="tau of InfoNCE, as adam.py's flag")
g.add_argument("--threshold", type=float, default=0.8,
               help="Purposive Pruner threshold t, as adam.py's flag (bank entries planted above it: 1%%)")
g = parser.add_argument_group("output")
g.add_argument("--md", default="", help="also write the table as markdown to this file (atomically)")
g.add_argument("--_mem", default="", help=argparse.SUPPRESS)  # internal: path,B,D,K,dtype -> peak RSS rise


def loop_info_nce(q, k, queue, temperature, threshold):
    """The brute-force reference (tests/test_adam.py checks adam.info_nce against it): the loss of
    docs/METHOD.md §4 as written, one anchor at a time, each with its own kept set P_i = {j : s_ij < t},
    then the mean. threshold None keeps every entry. Scores in the inputs' precision, the log-softmax in
    at least float32 (bf16 logits are upcast, float64 stays float64)."""
    losses = []
    for i in range(q.shape[0]):
        l_pos = (q[i] * k[i]).sum().view(1)                     # 1
        s = queue @ q[i]                                        # K: s_ij
        kept = s if threshold is None else s[s.detach() < threshold]  # P_i
        logits = torch.cat([l_pos, kept])                       # 1 + |P_i|
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[0])  # -log softmax of the positive
    return torch.stack(losses).mean()


def fused_with(kernel):
    """The op with the CUDA kernel choice set for this call (the launcher reads the variable at
    every call; the CPU kernel ignores it)."""
    def fn(q, k, b, T, t):
        os.environ["ADAM_INFO_NCE_CUDA_KERNEL"] = kernel
        return adam_ext.info_nce(q, k, b, T, t)
    return fn


def tf32(fn):
    """fn with TF32 allowed in float32 matmuls for the call (the C++ launcher reads the same flag)."""
    def wrapped(*args):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return fn(*args)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return wrapped


PATHS = {
    "torch": lambda q, k, b, T, t: adam.info_nce(q, k, b, T, t),
    "loop": loop_info_nce,
    "fused": fused_with("auto"),
    "fused_simple": fused_with("simple"),
    "fused_tc": tf32(fused_with("auto")),
    "torch_tf32": tf32(lambda q, k, b, T, t: adam.info_nce(q, k, b, T, t)),
}
CUDA_ONLY = {"fused_simple", "fused_tc", "torch_tf32"}  # kernel/precision choices: on CPU they repeat a row
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(B, D, K, dtype, device, copies=1, seed=0):
    """Unit-norm q, k and `copies` banks; 1% of each bank planted near q (pruned at t = 0.8).
    Normalised in place so that building a K x D bank needs no K x D temporary."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(B, D, device=device, generator=g), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(B, D, device=device, generator=g), dim=1)
    banks = []
    for _ in range(copies):
        b = torch.randn(K, D, device=device, generator=g)
        n = max(1, K // 100)
        b[:n] = q[torch.arange(n, device=device) % B] + 0.02 * torch.randn(n, D, device=device, generator=g)
        b /= b.norm(dim=1, keepdim=True)
        banks.append(b.to(dtype))
    return q.to(dtype), k.to(dtype), banks


def run_once(fn, q, k, bank, T, t, backward):
    if backward:
        qq = q.detach().requires_grad_()
        fn(qq, k, bank, T, t).backward()
    else:
        with torch.no_grad():
            fn(q, k, bank, T, t)


def time_cpu(fn, q, k, banks, T, t, backward, repeats):
    run_once(fn, q, k, banks[0], T, t, backward)  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once(fn, q, k, banks[0], T, t, backward)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def time_cuda(fn, q, k, banks, T, t, backward, repeats):
    for i in range(3):
        run_once(fn, q, k, banks[i % len(banks)], T, t, backward)
    ts = []
    for i in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run_once(fn, q, k, banks[i % len(banks)], T, t, backward)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def peak_mem_cuda(fn, q, k, bank, T, t):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_once(fn, q, k, bank, T, t, True)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_mem_cpu_child(spec, T, t):
    """Runs in a fresh process: peak-RSS rise (MiB) over one forward+backward call."""
    path, B, D, K, dt = spec.split(",")
    B, D, K = int(B), int(D), int(K)
    q, k, banks = make_inputs(B, D, K, DT[dt], "cpu")
    fn = PATHS[path]
    sq, sk, sb = make_inputs(min(B, 4), D, 256, DT[dt], "cpu")  # warm-up: loads MKL, op kernels
    run_once(fn, sq, sk, sb[0], T, t, True)
    # VmHWM is this process's peak RSS; writing 5 to clear_refs resets it to the current RSS
    # (Linux >= 4.0). ru_maxrss would not do: it carries the forking parent's peak across exec.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kib("VmRSS")
    run_once(fn, q, k, banks[0], T, t, True)
    after = _proc_status_kib("VmHWM")
    print(json.dumps({"mib": (after - before) / 1024}))


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (the CPU memory measurement needs Linux)")


def peak_mem_cpu(path, B, D, K, dt, T, t):
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem", f"{path},{B},{D},{K},{dt}", "--temperature", str(T),
           "--threshold", str(t), "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def floors_cuda(dtype, allow_tf32=False):
    """What PyTorch itself reaches on this device: clone bandwidth (bytes/s) and mm throughput
    (float32 at torch's default precision, or with TF32 allowed)."""
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    ts = time_cuda(lambda *a: x.clone(), None, None, [None], 0, 0, False, 10)
    bw = 2 * x.numel() / ts
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    mm = (lambda *_: a @ a) if not allow_tf32 else tf32(lambda *_: a @ a)
    tm = time_cuda(mm, None, None, [None], 0, 0, False, 10)
    return bw, 2 * 8192**3 / tm


def bench_row(args, path, B, D, K, dt, floors):
    dev, dtype = args.device, DT[dt]
    T, t = args.temperature, args.threshold
    if path == "torch" and 3 * B * K * 4 > args.max_ref_gib * 2**30:
        return None  # three B x K fp32 matrices alive at the peak, at least
    copies = 1 if dev == "cpu" else max(1, math.ceil(2 * 64 * 2**20 / (K * D * dtype.itemsize)) + 1)
    q, k, banks = make_inputs(B, D, K, dtype, dev, copies)
    fn, n = PATHS[path], B
    if path == "loop" and B > args.loop_anchors:
        n = args.loop_anchors
        q, k = q[:n].contiguous(), k[:n].contiguous()
    timer = time_cpu if dev == "cpu" else time_cuda
    reps = args.repeats if dev == "cpu" else 5 * args.repeats
    if path == "loop":
        reps = 1 if dev == "cpu" else 3
    fwd = timer(fn, q, k, banks, T, t, False, reps) * B / n
    fb = timer(fn, q, k, banks, T, t, True, reps) * B / n
    row = dict(device=dev, dtype=dt, B=B, D=D, K=K, path=path, approx=n < B, fwd_ms=1e3 * fwd, fb_ms=1e3 * fb)
    if not args.no_mem and path != "loop":  # the loop's graph holds every anchor's K logits: O(B K) too
        row["mem_mib"] = peak_mem_cuda(fn, q, k, banks[0], T, t) if dev == "cuda" else peak_mem_cpu(path, B, D, K, dt, T, t)
    if dev == "cuda" and path != "loop":
        bank_bytes = K * D * dtype.itemsize
        flops_fb = 4 * B * K * D  # scores + sum_j p_ij b_j (fused) / scores + dlogits @ bank (torch)
        bw, mm = floors["tf32" if path in ("fused_tc", "torch_tf32") and dt == "fp32" else dt]
        floor = max(bank_bytes / bw, flops_fb / mm)
        row.update(gbs=bank_bytes / fb / 1e9, tflops=flops_fb / fb / 1e12, floor_ms=1e3 * floor, x_floor=fb / floor)
    del q, k, banks
    return row


def fmt_table(rows):
    cols = ["device", "dtype", "B", "D", "K", "path", "fwd ms", "fwd+bwd ms", "peak extra MiB"]
    cuda = any(r["device"] == "cuda" for r in rows)
    if cuda:
        cols += ["GB/s", "TFLOP/s", "floor ms", "x floor"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        a = "~" if r["approx"] else ""
        v = [r["device"], r["dtype"], r["B"], r["D"], r["K"], r["path"], f"{a}{r['fwd_ms']:.1f}", f"{a}{r['fb_ms']:.1f}",
             f"{r['mem_mib']:.0f}" if "mem_mib" in r else "-"]
        if cuda:
            v += [f"{r['gbs']:.0f}", f"{r['tflops']:.1f}", f"{r['floor_ms']:.3f}", f"{r['x_floor']:.1f}"] if "gbs" in r else ["-"] * 4
        lines.append("| " + " | ".join(str(x) for x in v) + " |")
    return "\n".join(lines)


def pipeline(argv):
    """`bench.py pipeline [--batches N] [adam.py flags]`: images/s of adam.py's input pipeline alone, as the
    training loop sees it: the loader with its workers (Anatomy Decomposer + both views per sample), or with
    --gpu-views the workers' parts and BatchViews on the device; no model. The finest level of --levels,
    one pass over the images (no repeats), after two warm-up batches (worker start, first decode)."""
    p = argparse.ArgumentParser(prog="bench.py pipeline", description=pipeline.__doc__)
    p.add_argument("--batches", type=int, default=20, help="timed batches (fewer when the split is smaller)")
    own, rest = p.parse_known_args(argv)
    args = adam.parse_args(rest)
    device, _, _ = adam.setup_devices(args)
    images, _, views = adam.open_data(args, 1)
    batch, level = args.batch_size, args.level_list[-1]
    n = min(own.batches, len(images) // batch - 2)
    if n < 1:
        raise ValueError(f"bench.py pipeline needs at least {3 * batch} images, {images.name} has {len(images)}")
    loader, _ = adam.make_loader(images, level, num_samples=batch * (n + 2), seed=args.seed,
                                 ctx=adam.Context(args, device, views=views))
    it = iter(loader)
    adam.to_views(next(it), views, device), adam.to_views(next(it), views, device)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        adam.to_views(next(it), views, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate, cpu = n * batch / (time.perf_counter() - t0), (time.process_time() - c0) / (n * batch)
    # with 0 workers this process does all the work: its CPU time per image holds on a busy machine too
    print(f"input pipeline: {rate:.0f} images/s ({images.name}, level {level}, {args.img_size} px, batch {batch}, "
          f"{args.workers} workers, views {'BatchViews on ' + device.type if views else 'in workers'})"
          + (f"; {1000 * cpu:.1f} ms CPU per image in this process" if args.workers == 0 else ""))
    return rate


def selfcheck(argv):
    """`bench.py selfcheck [--device cuda] [--scale full]`: the fused op against adam.info_nce on one device, every
    kernel variant (adam_ext/selfcheck.py; the smoke test of a GPU machine, gpu_check.sh). Exit status 1 when a
    case disagrees."""
    p = argparse.ArgumentParser(prog="bench.py selfcheck", description=selfcheck.__doc__)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--scale", default="full", choices=["quick", "sanitize", "small", "full"],
                   help="quick: the start-of-training check; sanitize: one multi-tile case per kernel (for "
                        "compute-sanitizer racecheck/initcheck); small: every variant, small multi-tile shapes; "
                        "full: every variant plus the benchmark's multi-tile shapes")
    p.add_argument("--seed", type=int, default=None, help="input seed (default: fresh, printed)")
    p.add_argument("--no-profile", action="store_true", help="do not record which CUDA kernel ran (torch.profiler)")
    p.add_argument("--json", default="", help="write every result to this JSON file")
    p.add_argument("--md", default="", help="write a markdown table to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py selfcheck: --device cuda, but torch sees no GPU; use --device cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    t0 = time.perf_counter()
    results = adam_ext.self_check(device, adam.info_nce, scale=args.scale, seed=args.seed,
                                  profile=not args.no_profile, force=True)
    took = time.perf_counter() - t0
    for r in results:
        status = "skip" if r.get("skipped") else ("ok  " if r["ok"] else "FAIL")
        print(f"{status} {r['case']:<60} ran {r.get('ran', '-'):<7} {r['message']}")
    md = adam_ext.selfcheck.fmt_markdown(results, f"{name} ({adam_ext.build_info()}, torch {torch.__version__})")
    for path, text in ((args.json, json.dumps(results, indent=1, default=str)), (args.md, md)):
        if path:
            runs.write_atomic(path, lambda tmp: tmp.write_text(text))
    n_bad = sum(not r["ok"] for r in results)
    print(f"{len(results) - n_bad}/{len(results)} cases match adam.info_nce on {name} in {took:.1f} s "
          f"(seed {results[0]['seed'] if results else '-'})")
    if n_bad:
        sys.exit(f"bench.py selfcheck: {n_bad} of {len(results)} cases disagree with adam.info_nce on {name}")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pipeline"]:
        return pipeline(argv[1:])
    if argv[:1] == ["selfcheck"]:
        return selfcheck(argv[1:])
    args = parser.parse_args(argv)
    if args._mem:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        return peak_mem_cpu_child(args._mem, args.temperature, args.threshold)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not adam_ext.is_built():
        sys.exit(f"bench.py: {adam_ext.build_info()}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py: --device cuda but no GPU is visible")
    B, D, K = (int(x) for x in args.shape.split(","))
    dtypes = ["fp32"] if args.quick else args.dtypes.split(",")
    if args.quick:
        args.repeats = 3
    shapes = [(B, D, K)]
    if args.sweep and not args.quick:
        shapes += [(B, D, kk) for kk in (16384, 262144, 1048576) if kk != K]
        shapes += [(bb, D, K) for bb in (64, 1024) if bb != B]
    floors = None
    if args.device == "cuda":
        floors = {dt: floors_cuda(DT[dt]) for dt in dtypes}
        floors["tf32"] = floors_cuda(torch.float32, allow_tf32=True)
    rows = []
    for dt in dtypes:
        for (b, d, kk) in shapes:
            for path in args.paths.split(","):
                if path == "loop" and (b, d, kk) != (B, D, K):
                    continue  # the loop is linear in B and K; one row of it tells the story
                if path in CUDA_ONLY and (args.device != "cuda" or (dt == "bf16" and path != "fused_simple")):
                    continue  # on CPU they repeat a row; TF32 is a float32 setting
                r = bench_row(args, path, b, d, kk, dt, floors)
                if r is None:
                    print(f"skip torch at B={b} K={kk}: B x K matrices over --max-ref-gib", file=sys.stderr)
                    continue
                rows.append(r)
                print(fmt_table([r]).splitlines()[-1], flush=True)
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        cpu = platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
        name = (f"{cpu}, {torch.get_num_threads()} torch threads of "
                f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "uncommitted"
        dirty = subprocess.run(["git", "status", "--porcelain", "csrc", "adam_ext", "bench.py"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty and commit != "uncommitted" else ""
    except OSError:
        commit = "unknown"
    omp = os.environ.get("OMP_WAIT_POLICY")
    name += f", OMP_WAIT_POLICY={omp}" if omp and args.device == "cpu" else ""
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device: {name}; torch {torch.__version__}; "
            f"adam_ext {adam_ext.build_info()}; commit {commit}; T={args.temperature}, t={args.threshold}; "
            f"`python {' '.join(sys.argv)}`")
    table = fmt_table(rows)
    print("\n" + head + "\n\n" + table)
    if args.md:
        runs.write_atomic(args.md, lambda p: p.write_text(head + "\n\n" + table + "\n"))
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, adam.DataError) as e:  # bad input: one clear line, no traceback
        sys.exit(f"bench.py: error: {str(e).strip().splitlines()[-1]}")
