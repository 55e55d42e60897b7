"""Where a training step's time goes on the GPU: host against device, kernel by kernel,
and the launch geometry's effect on the kernels.

    PYTHONPATH=src python tools/gpu_profile.py --out "$OUT"

Writes ``OUT/profile.json`` after every step:

1. ``host``: Python time per call, the GPU never waited for (a queue of calls, one
   synchronization at the end), for the pieces of a training step on the L2-sized case:
   the launch geometry, one Triton launch, the forward, the backward, the whole autograd
   step (bnlab and torch), and a cProfile of bnlab's step; any host synchronization
   (``torch.cuda.set_sync_debug_mode``) is reported;
2. ``kernels``: for every benchmark case, each kernel's device time in one training step
   and one inference (``torch.profiler``), against the copy time;
3. ``sweep``: ``train_forward``, ``backward`` and ``inference`` (the host functions, no
   autograd) under other tile sizes, warps and programs per multiprocessor.

Dry run on a CPU: ``TRITON_INTERPRET=1 PYTHONPATH=src python tools/gpu_profile.py --device
cpu --out /tmp/prof`` (small shapes; the times mean nothing).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def host_per_call(fn, device, n):
    """Seconds of Python per call over n queued calls (then the wall time with the sync)."""
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    _sync(device)
    return host, (time.perf_counter() - t) / n


def host_section(device, small_shape, n):
    import torch

    import bnlab.torch as bt
    from bnlab.kernels import triton_bn as tb

    g = torch.Generator().manual_seed(0)
    x = torch.randn(small_shape, generator=g).to(device).requires_grad_()
    dy = torch.randn(small_shape, generator=g).to(device)
    ours = bt.BatchNorm2d(small_shape[1]).to(device)
    ours.backend = "triton"
    theirs = torch.nn.BatchNorm2d(small_shape[1]).to(device)
    xd = x.detach()
    run = tb._Launch(xd, torch.contiguous_format)
    parts = torch.empty((3, run.P, run.C), device=device)  # count, mean, M2 per part
    bad = torch.empty(run.grid, dtype=torch.int32, device=device)
    w, b = ours.weight.detach(), ours.bias.detach()
    rm, rv, nbt = ours.running_mean, ours.running_var, ours.num_batches_tracked
    y, mean, var, inv_std = tb.train_forward(xd, w, b, 1e-5, rm, rv, nbt, 0.1)

    pieces = {
        "_Launch": lambda: tb._Launch(xd, torch.contiguous_format),
        "torch.empty": lambda: torch.empty_like(xd),
        "geometry (cached)": lambda: tb._geometry(xd, torch.contiguous_format),
        "one triton JIT launch (_stats_kernel)":
            lambda: tb._stats_kernel[run.grid](xd, parts, bad, *run.args, *run.tiles,
                                               num_warps=run.num_warps),
        "train_forward": lambda: tb.train_forward(xd, w, b, 1e-5, rm, rv, nbt, 0.1),
        "backward": lambda: tb.backward(dy, xd, mean, inv_std, w, True),
        "inference": lambda: tb.inference(xd, rm, rv, w, b, 1e-5),
        "bnlab module forward (no grad)": lambda: _no_grad(ours, xd),
        "bnlab autograd step": lambda: torch.autograd.grad(ours(x), (x, ours.weight, ours.bias), dy),
        "torch autograd step": lambda: torch.autograd.grad(theirs(x), (x, theirs.weight, theirs.bias), dy),
    }
    pieces.update(_autograd_pieces(device, x, dy, ours, theirs, n))
    out = {}
    for name, fn in pieces.items():
        host, wall = host_per_call(fn, device, n)
        out[name] = {"host_us": round(host * 1e6, 1), "wall_us": round(wall * 1e6, 1)}
        print(f"host {name:40s} {host * 1e6:9.1f} us  (wall {wall * 1e6:9.1f} us)", flush=True)

    prof = cProfile.Profile()
    step = pieces["bnlab autograd step"]
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    _sync(device)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    out["cprofile_tottime"] = s.getvalue()[-6000:]

    syncs = []
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            ours.eval()
            _no_grad(ours, xd)
            ours.train()
        torch.cuda.set_sync_debug_mode(0)
        syncs = [str(c.message)[:300] for c in caught]
    out["synchronizing_calls"] = syncs
    print(f"synchronizing calls in a step: {len(syncs)}", flush=True)
    return out


def _autograd_pieces(device, x, dy, ours, theirs, n):
    """Where an autograd step's host time goes: graphs built ahead (one per call), so that
    ``autograd.grad`` is timed alone; a trivial Function as the engine's own cost; a lean
    one-output Function straight onto the kernels as the floor for a Python Function."""
    import torch

    from bnlab.kernels import triton_bn as tb

    class Trivial(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.view_as(a)

        @staticmethod
        def backward(ctx, g):
            return g

    class Lean(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, w, b, rm, rv, nbt):
            y, mean, _, inv_std = tb.train_forward(a, w, b, 1e-5, rm, rv, nbt, 0.1)
            ctx.save_for_backward(a, w, mean, inv_std)
            return y

        @staticmethod
        def backward(ctx, g):
            a, w, mean, inv_std = ctx.saved_tensors
            dx, dgamma, dbeta = tb.backward(g, a, mean, inv_std, w, True)
            return dx, dgamma, dbeta, None, None, None

    wrt = (x, ours.weight, ours.bias)
    lean_args = (x, ours.weight, ours.bias, ours.running_mean, ours.running_var,
                 ours.num_batches_tracked)

    def grad_only(make, inputs):
        state = {}

        def fn():
            if not state.get("it"):
                state["it"] = iter([make() for _ in range(n + 8)])
            try:
                y = next(state["it"])
            except StopIteration:
                state["it"] = iter([make() for _ in range(n + 8)])
                y = next(state["it"])
            return torch.autograd.grad(y, inputs, dy)
        return fn

    return {
        "bnlab forward with grad (graph built)": lambda: ours(x),
        "trivial Function: forward + grad": lambda: torch.autograd.grad(Trivial.apply(x), (x,), dy),
        "lean Function: forward + grad": lambda: torch.autograd.grad(Lean.apply(*lean_args), wrt, dy),
        "lean Function: forward with grad": lambda: Lean.apply(*lean_args),
        "bnlab: autograd.grad alone": grad_only(lambda: ours(x), wrt),
        "torch: autograd.grad alone": grad_only(lambda: theirs(x),
                                                (x, theirs.weight, theirs.bias)),
        "trivial: autograd.grad alone": grad_only(lambda: Trivial.apply(x), (x,)),
    }


def _no_grad(module, x):
    import torch

    with torch.no_grad():
        return module(x)


def kernel_section(device, cases):
    """Each kernel's device time in one training step and one inference, per case."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bnlab.bench_gpu as bg

    rows = []
    for case in cases:
        x, dy = bg.case_tensors(case, device)
        _, ours = bg._modules(case, device)
        xx = x.detach().requires_grad_()

        def train():
            return torch.autograd.grad(ours(xx), (xx, ours.weight, ours.bias), dy)

        def infer():
            with torch.no_grad():
                return ours.eval()(x)

        dst = torch.empty_like(x)
        row = {"case": case.name}
        for name, fn in (("copy", lambda: dst.copy_(x)), ("train", train), ("infer", infer)):
            for _ in range(3):
                fn()
            ours.train()
            _sync(device)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(5):
                    fn()
                ours.train()
                _sync(device)
            kernels = {}
            for e in prof.key_averages():
                t = getattr(e, "device_time_total", None)
                if t is None:
                    t = getattr(e, "cuda_time_total", 0)
                if device == "cuda" and e.device_type.name == "CUDA" and t > 0:
                    kernels[e.key[:90]] = round(t / 5, 2)  # us per step
            row[name] = {"kernels_us": kernels, "device_us": round(sum(kernels.values()), 2)}
        copy_us = row["copy"]["device_us"] or 1.0
        for name in ("train", "infer"):
            row[name]["copy_times"] = round(row[name]["device_us"] / copy_us, 2)
        print(f"kernels {case.name:30s} copy {row['copy']['device_us']:8.1f} us, train "
              f"{row['train']['device_us']:8.1f} us ({row['train']['copy_times']} copies), infer "
              f"{row['infer']['device_us']:8.1f} us ({row['infer']['copy_times']})", flush=True)
        for name in ("train", "infer"):
            for k, v in row[name]["kernels_us"].items():
                print(f"    {name:5s} {v:9.1f} us  {k}", flush=True)
        rows.append(row)
    return rows


CONFIGS = [  # (TILE_BYTES, num_warps or None for the default rule, PROGRAMS_PER_SM,
    #  num_stages or None for Triton's default)
    (8192, None, 8, None), (8192, None, 6, None), (8192, None, 16, None),
    (8192, None, 32, None), (16384, 8, 16, None), (4096, 4, 16, None),
]


def occupancy_section(device, cases):
    """Registers, spills and warps of every compiled launch of a training step and an
    inference per case, and the programs per multiprocessor they allow (threads: 2048 per
    SM; registers: 65536, allocated per warp in units of 256) against the grid."""
    import torch

    import bnlab.bench_gpu as bg
    from bnlab.kernels import triton_bn as tb

    original = tb._go
    rows = []
    sms = tb.multiprocessors(torch.device(device))

    def go(plan, i, kernel, grid, args, num_warps=4):
        compiled = kernel[grid](*args, num_warps=num_warps)
        regs = getattr(compiled, "n_regs", None)
        per_warp = None if regs is None else -(-regs * 32 // 256) * 256
        by_regs = None if not per_warp else 65536 // (per_warp * num_warps)
        slots = min(2048 // (32 * num_warps), by_regs or 64, 32)
        programs = 1
        for g in grid:
            programs *= g
        rows.append({"case": case.name, "kernel": kernel.fn.__name__, "grid": list(grid),
                     "programs": programs, "num_warps": num_warps, "n_regs": regs,
                     "n_spills": getattr(compiled, "n_spills", None),
                     "programs_per_sm": slots, "waves": round(programs / (slots * sms), 3)})
        print(f"occupancy {json.dumps(rows[-1])}", flush=True)

    tb._go = go
    try:
        for case in cases:
            x, dy = bg.case_tensors(case, device)
            C = case.shape[1]
            w, b = torch.ones(C, device=device), torch.zeros(C, device=device)
            rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
            _, mean, _, inv_std = tb.train_forward(x, w, b, 1e-5, rm, rv, None, 0.1)
            tb.backward(dy, x, mean, inv_std, w, True)
            tb.inference(x, rm, rv, w, b, 1e-5)
    finally:
        tb._go = original
    return rows


def sweep_section(device, cases, timer):
    import torch

    import bnlab.bench_gpu as bg
    from bnlab.kernels import triton_bn as tb

    original = (tb.TILE_BYTES, tb.PROGRAMS_PER_SM, tb._Launch, tb._go)
    rows = []
    try:
        for case in cases:
            x, dy = bg.case_tensors(case, device)
            C = case.shape[1]
            w = torch.ones(C, device=device)
            b = torch.zeros(C, device=device)
            rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
            dst = torch.empty_like(x)
            copy = timer(lambda: dst.copy_(x))
            for tile, warps, pps, stages in CONFIGS:
                tb.TILE_BYTES, tb.PROGRAMS_PER_SM = tile, pps
                tb.clear_caches()

                def go(plan, i, kernel, grid, args, num_warps=4, stages=stages):
                    options = {} if stages is None else {"num_stages": stages}
                    kernel[grid](*args, num_warps=num_warps, **options)

                tb._go = go

                class Launch(original[2]):
                    def __init__(self, x, fmt, warps=warps):
                        super().__init__(x, fmt)
                        if warps is not None:
                            self.num_warps = warps

                tb._Launch = Launch
                try:
                    _, mean, _, inv_std = tb.train_forward(x, w, b, 1e-5, rm, rv, None, 0.1)
                    t = {"forward": timer(lambda: tb.train_forward(x, w, b, 1e-5, rm, rv, None, 0.1)),
                         "backward": timer(lambda: tb.backward(dy, x, mean, inv_std, w, True)),
                         "inference": timer(lambda: tb.inference(x, rm, rv, w, b, 1e-5))}
                    geometry = tb._geometry(x, tb.memory_format(x))
                    row = {"case": case.name, "tile_bytes": tile, "num_warps": geometry.num_warps,
                           "programs_per_sm": pps, "num_stages": stages,
                           "tile": [geometry.BN, geometry.BC, geometry.BL], "P": geometry.P,
                           "fused": geometry.fused,
                           "copy_times": {k: round(v / copy, 3) for k, v in t.items()}}
                    row["copy_times"]["train"] = round(row["copy_times"]["forward"]
                                                       + row["copy_times"]["backward"], 3)
                except Exception:  # noqa: BLE001
                    row = {"case": case.name, "tile_bytes": tile, "num_warps": warps,
                           "programs_per_sm": pps, "num_stages": stages, "error": traceback.format_exc()[-800:]}
                print(f"sweep {json.dumps(row)[:400]}", flush=True)
                rows.append(row)
    finally:
        tb.TILE_BYTES, tb.PROGRAMS_PER_SM, tb._Launch, tb._go = original
        tb.clear_caches()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_profile_out"))
    p.add_argument("--sections", default="host,occupancy,kernels,sweep")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import bnlab.bench_gpu as bg

    cuda = args.device == "cuda"
    cases = bg.CASES if cuda else bg.SMALL_CASES[:2]
    sweep_cases = [c for c in cases if c.name in (
        "256x64x56x56 float32 NCHW", "256x64x56x56 float16 NCHW", "256x64x56x56 float16 NHWC",
        "8192x4096 float32 NC")] if cuda else cases[:1]
    report = {"environment": bg.environment(args.device)}
    start = time.perf_counter()

    def save():
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        (out / "profile.json").write_text(json.dumps(report, indent=1))

    sections = args.sections.split(",")
    for name, fn in (("host", lambda: host_section(args.device, (64, 64, 32, 32) if cuda
                                                    else (6, 5, 7, 9), 200 if cuda else 3)),
                     ("occupancy", lambda: occupancy_section(args.device, cases)),
                     ("kernels", lambda: kernel_section(args.device, cases)),
                     ("sweep", lambda: sweep_section(args.device, sweep_cases,
                                                     bg._timer(args.device, 40)))):
        if name not in sections:
            continue
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:  # noqa: BLE001
            report[name + "_error"] = traceback.format_exc()
            print(report[name + "_error"], flush=True)
        print(f"== {name}: {time.perf_counter() - t:.1f} s", flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
