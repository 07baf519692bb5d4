"""Benchmarks: the pruned InfoNCE loss (docs/METHOD.md §4, §6) three ways, and adam.py's training on a GPU.

  python bench.py [flags]                   the loss paths below, as a table (BENCHMARKS.md)
  python bench.py train [adam.py flags]     images/s of adam.train_step: alone, fed by device views, fed by the
                                            CPU loader (see train(); docs/gpu.md)
  python bench.py pipeline [adam.py flags]  images/s of the input pipeline alone (see pipeline())
  python bench.py loader [adam.py flags]    CPU ms per image of the device-views loader, stage by stage
  python bench.py views                     BatchViews and kornia against torchvision's sampling of the views
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
  python bench.py pipeline --data chestxray14 --batches 20 --views device   # images/s of the views on the GPU
"""
import argparse
import itertools
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
from adam_cxr import monitor, runs

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
    device views (--views device) the workers' parts and BatchViews on the device; no model. The finest level of --levels,
    one pass over the images (no repeats), after two warm-up batches (worker start, first decode)."""
    p = argparse.ArgumentParser(prog="bench.py pipeline", description=pipeline.__doc__)
    p.add_argument("--batches", type=int, default=20, help="timed batches (fewer when the split is smaller)")
    own, rest = p.parse_known_args(argv)
    args = adam.parse_args(rest)
    device, _, _ = adam.setup_devices(args)
    images, _, views = adam.open_data(args, 1, device)
    batch, level = args.batch_size, args.level_list[-1]
    n = min(own.batches, len(images) // batch - 2)
    if n < 1:
        raise ValueError(f"bench.py pipeline needs at least {3 * batch} images, {images.name} has {len(images)}")
    loader, _ = adam.make_loader(images, level, num_samples=batch * (n + 2), seed=args.seed,
                                 ctx=adam.Context(args, device, views=views))
    it = adam.device_batches(loader, device, views)
    adam.to_views(next(it), views), adam.to_views(next(it), views)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        adam.to_views(next(it), views)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate, cpu = n * batch / (time.perf_counter() - t0), (time.process_time() - c0) / (n * batch)
    # with 0 workers this process does all the work: its CPU time per image holds on a busy machine too
    print(f"input pipeline: {rate:.0f} images/s ({images.name}, level {level}, {args.img_size} px, batch {batch}, "
          f"{args.workers} workers, views {'BatchViews on ' + device.type if views else 'in workers'})"
          + (f"; {1000 * cpu:.1f} ms CPU per image in this process" if args.workers == 0 else ""))
    return rate


class KorniaViews:
    """Adam's views (docs/METHOD.md §3) made by kornia.augmentation on the device, for the comparison of docs/gpu.md:
    the same interface as gpu_views.BatchViews.make (uint8 parts and the workers' parameters, which kornia ignores:
    it draws its own). Set up as close to torchvision as kornia allows: RandomRotation with p = 1 (kornia's default
    rotates half the samples), and for grey parts ColorJitter without saturation and hue, which leave grey unchanged
    (kornia's would need 3 channels). Not a training option: the comparison did not adopt it."""

    def __init__(self, img_size, channels=1):
        import kornia.augmentation as K
        s = img_size / 224
        grey = channels == 1
        self.aug = K.AugmentationSequential(
            K.RandomResizedCrop((img_size, img_size), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)),
            K.ColorJitter(0.4, 0.4, 0.0 if grey else 0.4, 0.0 if grey else 0.1, p=0.8),
            K.RandomGaussianBlur((2 * round(11 * s) + 1,) * 2, (0.1 * s, 2.0 * s), p=0.5),
            K.RandomRotation(30.0, p=1.0))

    def make(self, x, params=None):
        x = x.float() / 255                                                  # B x C x H x W in [0, 1]
        return self.aug(x), self.aug(x)


def _host_syncs(fn):
    """How many times fn makes the host wait for the GPU (torch.cuda's sync debug mode warns at each)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


TRAIN_ROWS = {"step": "step alone (synthetic views on the device)",
              "monitor": "step alone + monitor on every step",
              "device": "step fed by device views (BatchViews)",
              "kornia": "step fed by device views (kornia)",
              "cpu": "step fed by the CPU loader (views in workers)"}


def train(argv):
    """`bench.py train [--steps N] [--warmup N] [--rows ...] [adam.py flags]`: images/s of adam.py's training step,
    adam.train_step itself - student forward and backward, teacher keys, pruned InfoNCE against the bank, SGD, EMA,
    enqueue - in the run's precision (bf16 autocast on CUDA) and memory format, with the run's flags (--compile,
    --fused-sgd, --memory-format, --loss), fed three ways, a row each:
      step     synthetic views already on the device (random, the views' shape and layout): the ceiling
      device   views made on the device (BatchViews) from the parts that the loader's workers read from the cache
      cpu      views made per sample by torchvision in the loader's workers (adam.AdamViews)
    and on request: monitor (the step with the embedding monitor observing every step, its worst case: adam.py
    observes 16-31 steps an epoch), kornia (the device row with kornia.augmentation making the views).
    Level: the finest of --levels; the loader loops over the train split as often as needed, through
    adam.device_batches (pinned memory, copied ahead on a side stream). Each row: --warmup steps (cuDNN's choices,
    the workers' start, torch.compile), then --steps timed ones between two device synchronisations. Peak memory:
    max_memory_allocated over the row on CUDA; on the CPU this process's peak RSS (the workers' not included).
    Host syncs (CUDA): torch.cuda's sync debug mode counts them over one more step, loader included."""
    p = argparse.ArgumentParser(prog="bench.py train", description=train.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=runs.number(int, 1), default=20, help="timed steps per row")
    p.add_argument("--warmup", type=runs.number(int, 1), default=5, help="untimed steps before them")
    p.add_argument("--rows", default="step,device,cpu", help=f"comma list of {', '.join(TRAIN_ROWS)}")
    p.add_argument("--md", default="", help="also write the table as markdown to this file (atomically)")
    own, rest = p.parse_known_args(argv)
    rows_wanted = own.rows.split(",")
    if not set(rows_wanted) <= set(TRAIN_ROWS):
        raise ValueError(f"--rows {own.rows}: choose from {', '.join(TRAIN_ROWS)}")
    args = adam.parse_args(rest)
    device, _, _ = adam.setup_devices(args)
    torch.manual_seed(args.seed)
    B, S, level, cuda = args.batch_size, args.img_size, args.level_list[-1], device.type == "cuda"
    student, teacher, bank, model, teacher_fwd, groups, layout = adam.build_models(args, device, 1, B)
    criterion = adam.choose_loss(args.loss, device, print)
    optimizer = adam.make_optimizer(student, args.lr * B / 256, args)
    t = adam.pruning_threshold(args, level)

    def fed(where, make=None):
        """Views from the loader: where = 'device' or 'cpu' (adam.py's --views), make: another view maker."""
        a = argparse.Namespace(**{**vars(args), "views": where})
        images, _, views = adam.open_data(a, 1, device)
        loader, sampler = adam.make_loader(images, level, num_samples=len(images) // B * B, seed=args.seed,
                                           ctx=adam.Context(a, device, views=views))
        maker = make(S, images[0].shape[0]) if make else views  # kornia: the same parts, its own parameters

        def looped():
            for epoch in itertools.count():
                sampler.set_epoch(0, epoch)
                yield from loader
        return (adam.to_views(item, maker, layout) for item in adam.device_batches(looped(), device, views))

    def synthetic():
        x_q, x_k = (torch.randn(B, 3, S, S, device=device).to(memory_format=layout) for _ in range(2))
        return itertools.repeat((x_q, x_k))

    def timed(name, batches):
        mon = monitor.Monitor(args.threshold, 1) if name == "monitor" else None  # 1 step an epoch: observes each
        step = lambda i: adam.train_step(*next(batches), model, teacher_fwd, bank, optimizer, args, t, criterion,
                                         groups, mon, i)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:  # VmHWM (peak RSS) restarts from the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        for i in range(own.warmup):
            loss, _ = step(i)
        loss.item()
        t0 = time.perf_counter()
        for i in range(own.steps):
            loss, _ = step(own.warmup + i)
        loss.item()  # waits for the device: every queued step has run
        dt = time.perf_counter() - t0
        syncs = _host_syncs(lambda: step(0)) if cuda else None
        mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else _proc_status_kib("VmHWM") / 1024
        return dict(row=name, images_per_s=own.steps * B / dt, ms_per_step=1e3 * dt / own.steps, mem_mib=mem,
                    host_syncs=syncs, loss=loss.item())

    makers = {"step": synthetic, "monitor": synthetic, "device": lambda: fed("device"),
              "kornia": lambda: fed("device", KorniaViews), "cpu": lambda: fed("cpu")}
    rows = []
    for name in rows_wanted:
        try:
            rows.append(timed(name, makers[name]()))
        except (ValueError, ImportError) as e:  # no cache for device views, no kornia: the row says why
            rows.append(dict(row=name, skipped=str(e).strip().splitlines()[-1]))
        print(fmt_train([rows[-1]], rows).splitlines()[-1], flush=True)
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device: {_device_name(device)}; torch "
            f"{torch.__version__}; {args.arch}, {S} px, batch {B}, K={args.queue_size}, level {level}, "
            f"{'bf16 autocast' if cuda else 'fp32'}, {str(layout).split('.')[-1]}, loss {'torch' if criterion is adam.info_nce else 'fused'}, "
            f"SGD {'fused' if args.fused_sgd else 'default'}, compile {'on' if args.compile else 'off'}, "
            f"{args.workers} workers; {own.warmup} + {own.steps} steps a row; `python bench.py train {' '.join(argv)}`")
    table = fmt_train(rows, rows)
    print("\n" + head + "\n\n" + table)
    if own.md:
        runs.write_atomic(own.md, lambda f: f.write_text(head + "\n\n" + table + "\n"))
    return rows


def fmt_train(rows, all_rows):
    base = next((r["images_per_s"] for r in all_rows if r["row"] == "step" and "images_per_s" in r), None)
    gpu = any(r.get("host_syncs") is not None for r in all_rows)
    cols = ["configuration", "images/s", "share of step alone", "ms/step",
            "peak GPU MiB" if gpu else "peak RSS MiB (this process)", "host syncs/step"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {TRAIN_ROWS[r['row']]} | skipped: {r['skipped']} | | | | |")
            continue
        share = f"{100 * r['images_per_s'] / base:.0f}%" if base else "-"
        syncs = "-" if r["host_syncs"] is None else r["host_syncs"]
        lines.append(f"| {TRAIN_ROWS[r['row']]} | {r['images_per_s']:.1f} | {share} | {r['ms_per_step']:.1f} | "
                     f"{r['mem_mib']:.0f} | {syncs} |")
    return "\n".join(lines)


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs of a and b."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    return ((torch.searchsorted(a, grid, right=True) / len(a)) - (torch.searchsorted(b, grid, right=True) / len(b))) \
        .abs().max().item()


def _torchvision_draws(n, H, W, S):
    """n samples of the random parameters of one AdamViews view of an H x W part, drawn by torchvision's own
    transforms (make_params, RandomApply's coin), as AdamViews draws them."""
    from torchvision.transforms import v2 as T
    crop, jitter, rot = T.RandomResizedCrop(S, scale=(0.2, 1.0)), T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.RandomRotation(30)
    blur = adam.SeparableGaussianBlur(2 * round(11 * S / 224) + 1, sigma=(0.1 * S / 224, 2.0 * S / 224))
    part, rows = torch.empty(1, H, W), []
    for _ in range(n):
        c = crop.make_params([part])
        jittered = torch.rand(1).item() < 0.8                                # RandomApply(p=0.8)
        j = jitter.make_params([]) if jittered else None
        blurred = torch.rand(1).item() < 0.5
        sigma = blur.make_params([])["sigma"][0] if blurred else 0.0
        rows.append((c["top"], c["left"], c["height"], c["width"], rot.make_params([])["angle"],
                     *((j["brightness_factor"], j["contrast_factor"], j["saturation_factor"], j["hue_factor"])
                       if jittered else (1.0, 1.0, 1.0, 0.0)),
                     *(j["fn_idx"].tolist() if jittered else (0, 1, 2, 3)), sigma))
    return torch.tensor(rows, dtype=torch.float64)


def _kornia_draws(n, B, H, W, S):
    """The same parameters as KorniaViews draws them (its generators, batches of B): rows as BatchViews.draw's,
    the order as the batch's one permutation (kornia draws one per call), the rotation only where applied."""
    views = KorniaViews(S, channels=3)
    crop, jitter, blur, rot = views.aug.children()
    rows = []
    for _ in range(n // B):
        c, j = crop.forward_parameters(torch.Size([B, 3, H, W])), jitter.forward_parameters(torch.Size([B, 3, H, W]))
        g, r = blur.forward_parameters(torch.Size([B, 3, H, W])), rot.forward_parameters(torch.Size([B, 3, H, W]))
        src = c["src"]                                                       # B x 4 corners (x, y)
        on = j["batch_prob"] > 0.5
        f = torch.stack([j["brightness_factor"], j["contrast_factor"], j["saturation_factor"], j["hue_factor"]], 1)
        f = torch.where(on[:, None], f, torch.tensor([1.0, 1.0, 1.0, 0.0]))
        order = torch.where(on[:, None], j["order"].expand(B, 4), torch.arange(4))
        sigma = torch.where(g["batch_prob"] > 0.5, g["sigma"].flatten()[:B] if g["sigma"].dim() == 1 else g["sigma"][:, 0], 0.0)
        angle = torch.where(r["batch_prob"] > 0.5, r["degrees"], float("nan"))
        rows.append(torch.cat([src[:, 0, 1:2], src[:, 0, 0:1], src[:, 2, 1:2] - src[:, 0, 1:2] + 1,
                               src[:, 1, 0:1] - src[:, 0, 0:1] + 1, angle[:, None], f, order.double(),
                               sigma[:, None]], 1).double())
    return torch.cat(rows)


def views_fidelity(argv):
    """`bench.py views [--samples N] [--batch B]`: how closely BatchViews (--views device) and kornia.augmentation
    (KorniaViews) follow torchvision's sampling of Adam's views (docs/METHOD.md §3), on the CPU: each random
    parameter's distribution against torchvision's own draws (AdamViews), as the two-sample Kolmogorov-Smirnov
    distance D (the 1% critical value printed beside), shares (jitter 0.8, blur 0.5, rotation 1) and how often
    two samples of one batch share the jitter's order (torchvision: a permutation per sample, 1/24); then two pixel
    checks against torchvision with the same parameters: a 1-px checkerboard shrunk 3.75x (antialiasing: torchvision
    gives flat 0.5) and a smooth image rotated 25 degrees (bilinear; the max difference away from the corners).
    Parameters of a 256 x 200 part (H x W) and 224 px views. kornia is optional: without it only BatchViews."""
    from torchvision.transforms import v2 as T
    from adam_cxr import gpu_views
    p = argparse.ArgumentParser(prog="bench.py views", description=views_fidelity.__doc__)
    p.add_argument("--samples", type=runs.number(int, 256), default=4096, help="draws per sampler")
    p.add_argument("--batch", type=runs.number(int, 2), default=256, help="batch size for kornia's draws")
    own = p.parse_args(argv)
    n, H, W, S = own.samples // own.batch * own.batch, 256, 200, 224
    torch.manual_seed(0)
    draws = {"torchvision": _torchvision_draws(n, H, W, S),
             "BatchViews": gpu_views.BatchViews(S).draw(torch.tensor([[0, 0, H, W]] * (n // 2)),
                                                        torch.randint(2**62, (n // 2,))).flatten(0, 1)}
    try:
        draws["kornia"] = _kornia_draws(n, own.batch, H, W, S)
        kornia_note = ""
    except ImportError as e:
        kornia_note = f" (kornia: not importable, {e})"
    quantities = {  # name -> (rows -> values), over the samples where the step applies
        "crop area / part area": lambda r: r[:, 2] * r[:, 3] / (H * W),
        "crop log(w / h)": lambda r: (r[:, 3] / r[:, 2]).log(),
        "crop centre x / W": lambda r: (r[:, 1] + r[:, 3] / 2) / W,
        "crop centre y / H": lambda r: (r[:, 0] + r[:, 2] / 2) / H,
        "rotation angle (deg)": lambda r: r[:, 4][~r[:, 4].isnan()],
        "brightness factor (jittered)": lambda r: r[:, 5][r[:, 5:9].ne(torch.tensor([1.0, 1, 1, 0])).any(1)],
        "hue factor (jittered)": lambda r: r[:, 8][r[:, 5:9].ne(torch.tensor([1.0, 1, 1, 0])).any(1)],
        "blur sigma (blurred)": lambda r: r[:, 13][r[:, 13] > 0]}
    shares = {
        "rotated": lambda r: (~r[:, 4].isnan()).double().mean().item(),
        "jittered": lambda r: r[:, 5:9].ne(torch.tensor([1.0, 1, 1, 0])).any(1).double().mean().item(),
        "blurred": lambda r: (r[:, 13] > 0).double().mean().item(),
        "same jitter order, two jittered samples of one batch": lambda r: _same_order(r, own.batch)}
    names = list(draws)
    lines = ["| quantity | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    crit = 1.63 * math.sqrt(2 / n)
    for q, f in quantities.items():
        ref = f(draws["torchvision"])
        cells = [f"mean {ref.mean():.3f}"] + [f"D = {_ks(ref, f(draws[k])):.3f} (mean {f(draws[k]).mean():.3f})"
                                             for k in names[1:]]
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    for q, f in shares.items():
        lines.append(f"| share {q} | " + " | ".join(f"{f(draws[k]):.3f}" for k in names) + " |")
    lines += _pixel_checks(names, S)
    print(f"{n} draws each, part {H} x {W}, {S} px views; D's 1% critical value {crit:.3f}{kornia_note}\n")
    print("\n".join(lines))
    return draws


def _same_order(rows, batch):
    """The share of pairs of jittered samples in one batch (consecutive rows) that share the jitter's order."""
    same, pairs = 0, 0
    for b in rows.split(batch):
        on = b[:, 5:9].ne(torch.tensor([1.0, 1, 1, 0])).any(1)
        o = b[on][:, 9:13]
        eq = (o[:, None] == o[None]).all(-1)
        same, pairs = same + (eq.sum().item() - len(o)) / 2, pairs + len(o) * (len(o) - 1) / 2
    return same / max(pairs, 1)


def _pixel_checks(names, S):
    """The two pixel rows of views_fidelity: shrinking a checkerboard 3.75x, rotating a smooth image 25 degrees."""
    from torchvision.transforms import v2 as T
    from adam_cxr import gpu_views
    board = ((torch.arange(128).view(-1, 1) + torch.arange(128)) % 2).float().view(1, 1, 128, 128)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 96), indexing="ij")
    smooth = (0.5 + 0.3 * torch.sin(3 * xx + 2 * yy) * torch.cos(2 * xx - yy)).view(1, 1, 96, 96)
    shrunk = {"torchvision": T.functional.resized_crop(board, 0, 0, 120, 120, [32, 32], antialias=True),
              "BatchViews": gpu_views.BatchViews(32).views_with(
                  board, torch.tensor([[0, 0, 120, 120, 0, 1, 1, 1, 0, 0, 1, 2, 3, 0]], dtype=torch.float64))}
    rotated = {"torchvision": T.functional.rotate(smooth, 25.0, interpolation=T.InterpolationMode.BILINEAR),
               "BatchViews": gpu_views.BatchViews(96).views_with(
                   smooth, torch.tensor([[0, 0, 96, 96, 25, 1, 1, 1, 0, 0, 1, 2, 3, 0]], dtype=torch.float64))}
    if "kornia" in names:
        import kornia.augmentation as K
        crop = K.RandomResizedCrop((32, 32), scale=(120 ** 2 / 128 ** 2,) * 2, ratio=(1.0, 1.0))
        shrunk["kornia"] = crop(board)                                       # a 120 px crop, at a random place
        rotated["kornia"] = K.RandomRotation((25.0, 25.0), p=1.0)(smooth)
    inside = T.functional.rotate(torch.ones(1, 1, 96, 96), 25.0) > 0.999     # away from the rotated corners
    inside = -F.max_pool2d(-inside.float(), 7, stride=1, padding=3) > 0.5
    return [f"| pixels: checkerboard shrunk 3.75x, max abs(v - 0.5) | "
            + " | ".join(f"{(shrunk[k] - 0.5).abs().max():.3f}" for k in names) + " |",
            f"| pixels: rotated 25 deg, max abs difference to torchvision (interior) | "
            + " | ".join(f"{(rotated[k] - rotated['torchvision'])[inside].abs().max():.4f}" for k in names) + " |"]


class _TimedBatches(torch.utils.data.Dataset):
    """The worker side of the device-views loader, timed inside a DataLoader worker: [(index, seed), ...] -> (the
    batch as the worker ships it, thread CPU seconds of: the samples (read + pad + draw), the collate into shared
    memory, the parts' reads alone (one part of the level per sample, for the split of the first))."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return 0

    def __getitem__(self, items):
        c0 = time.thread_time()
        samples = [self.dataset[it] for it in items]
        c1 = time.thread_time()
        batch = torch.utils.data.default_collate(samples)  # in a worker: stacked straight into shared memory
        c2 = time.thread_time()
        images, parts = self.dataset.images, adam.anatomy_parts(*self.dataset.images.size, self.dataset.level)
        for j, (index, _) in enumerate(items):
            images.part(index, *parts[j % len(parts)])
        return batch, torch.tensor([c1 - c0, c2 - c1, time.thread_time() - c2])


def loader_cost(argv):
    """`bench.py loader [--batches N] [adam.py flags]`: CPU milliseconds per image on the host side of device views
    (--views device), stage by stage, at every level of --levels: in one DataLoader worker (one thread), the
    samples - the AD's part read from the cache's memory map, padded to the level's largest part, both views'
    parameters drawn - and, timed apart, the parts' reads alone; the collate of a batch into shared memory; then in
    this process the copy into pinned memory that the DataLoader's pin thread makes (without CUDA, a copy into
    ordinary memory stands in, and the table says so). Each batch is read once untimed first: the page cache is
    warm, as on a machine whose RAM holds the cache; a cold read costs what the disk does."""
    p = argparse.ArgumentParser(prog="bench.py loader", description=loader_cost.__doc__)
    p.add_argument("--batches", type=runs.number(int, 1), default=10, help="timed batches per level")
    own, rest = p.parse_known_args(argv)
    args = adam.parse_args(rest)
    images, _, views = adam.open_data(argparse.Namespace(**{**vars(args), "views": "device"}), 1, torch.device("cpu"))
    B, n = args.batch_size, min(own.batches, len(images) // args.batch_size)
    pin = torch.cuda.is_available()
    rows = []
    for level in args.level_list:
        items = list(adam.PartSampler(len(images), n * B, args.seed))
        batches = [items[i * B:(i + 1) * B] for i in range(n)]
        loader = lambda: torch.utils.data.DataLoader(_TimedBatches(adam.AdamViews(images, level, args.img_size, views)),
                                                     batch_size=None, sampler=batches, num_workers=1)
        list(loader())  # warm-up: the page cache, the worker's first imports
        cost = torch.zeros(4, dtype=torch.float64)
        for batch, worker in loader():
            c = time.thread_time()
            [x.pin_memory() if pin else x.clone() for x in batch]  # the parts and the views' parameters
            cost += torch.cat([worker.double(), torch.tensor([time.thread_time() - c], dtype=torch.float64)])
        sample, collate, read, pinning = (1e3 * cost / (n * B)).tolist()
        part = batch[0].shape[1:]
        rows.append(dict(level=level, part="x".join(map(str, part)), sample=sample, read=read, collate=collate,
                         pin=pinning, total=sample + collate + pinning))
    head = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_device_name(torch.device('cpu'))}; torch "
            f"{torch.__version__}; {images.name} ({'x'.join(map(str, images.size))} px), batch {B}, {n} batches a "
            f"level; `python bench.py loader {' '.join(argv)}`")
    cols = ["level", "part (C x H x W)", "sample: read + pad + draw", "of which read", "collate (shared memory)",
            "pin" if pin else "copy (no CUDA here: stands in for the pin)", "total ms/image", "images/s per worker"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += [f"| {r['level']} | {r['part']} | {r['sample']:.3f} | {r['read']:.3f} | {r['collate']:.3f} | "
              f"{r['pin']:.3f} | {r['total']:.3f} | {1e3 / r['total']:.0f} |" for r in rows]
    print(head + "\n\n" + "\n".join(lines))
    return rows


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    return (f"{cpu}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores, load average "
            f"{os.getloadavg()[0]:.1f}")


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
    commands = {"pipeline": pipeline, "train": train, "loader": loader_cost, "views": views_fidelity,
                "selfcheck": selfcheck}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
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
    name = _device_name(torch.device(args.device)) + ("" if args.device == "cuda" else " at the end")
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
