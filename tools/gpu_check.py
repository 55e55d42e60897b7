"""Check and time bnlab's Triton kernels on a GPU in one call.

Runs from the source tree without installing (the GPU machine has torch, Triton and numba
but no network, no mlxtend, matplotlib or pooch):

    PYTHONPATH=src python tools/gpu_check.py --out "$OUT"

1. the correctness cases of tools/gpu_cases.py on CUDA (the small ones first, the
   benchmark-sized ones last), each against bnlab's float64 NumPy reference and torch's
   own running statistics, with a bitwise determinism check;
2. ``bnlab bench --device cuda`` (:mod:`bnlab.bench_gpu`): bnlab against torch's native
   kernels and a device copy, in copy-times and ratios;
3. SyncBatchNorm on the GPU in 2 processes (gloo, sharing the one GPU) against torch's BN
   over the whole batch, and a short ``bnlab train --engine torch --device cuda``.

Everything goes to ``OUT/gpu_check.json`` after every step (a timeout still leaves what
was measured), the benchmark also to ``OUT/bench-gpu.json`` (the format of
docs/bench-gpu.json) and ``OUT/bench-gpu.txt``. A time budget (default 270 s) skips the
remaining large correctness cases rather than running over the call's limit.

Dry run on a CPU (the kernels in Triton's interpreter, small cases and small bench shapes):

    TRITON_INTERPRET=1 PYTHONPATH=src python tools/gpu_check.py --device cpu --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


class _Skipped(Exception):
    pass


def _sync_worker(rank, world, out_dir, device):
    """SyncBatchNorm (the Triton engine on CUDA) over 2 processes sharing one GPU (gloo)."""
    import torch

    import bnlab.torch as bt

    g = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(12, 8, 9, 9, generator=g)).to(device)
    dy = torch.randn(12, 8, 9, 9, generator=g).to(device)
    if device == "cuda" and torch.cuda.device_count() >= 2:
        device = f"cuda:{rank}"  # NCCL: a GPU per rank
        torch.cuda.set_device(rank)
    bn = bt.SyncBatchNorm(8).to(device)
    lo, hi = (0, 5) if rank == 0 else (5, 12)
    xs = x[lo:hi].clone().requires_grad_()
    y = bn(xs)
    y.backward(dy[lo:hi])
    torch.save({k: v.cpu() for k, v in dict(y=y.detach(), dx=xs.grad, dw=bn.weight.grad,
                                            rm=bn.running_mean).items()},
               Path(out_dir) / f"sync{rank}.pt")


def sync_backend(device: str) -> tuple[str, str]:
    """The process-group backend for the 2-process check and why: NCCL on CUDA when there
    are two GPUs (NCCL refuses two ranks on one GPU), else gloo."""
    import torch

    if device != "cuda":
        return "gloo", "CPU tensors"
    if torch.cuda.device_count() >= 2:
        return "nccl", "a GPU per rank"
    return "gloo", "one GPU: NCCL needs a GPU per rank, so both ranks share it over gloo"


def check_distributed(device: str, out: Path) -> dict:
    """SyncBatchNorm on ``device`` in 2 processes against torch's BN over the whole batch,
    and a short ``bnlab train --engine torch`` run on ``device``."""
    import subprocess

    import torch

    from bnlab.torch import distributed

    backend, why = sync_backend(device)
    distributed.launch(_sync_worker, 2, args=(str(out), device), backend=backend,
                       deadline=120)
    g = torch.Generator().manual_seed(0)
    x = (3 + 2 * torch.randn(12, 8, 9, 9, generator=g)).to(device).requires_grad_()
    dy = torch.randn(12, 8, 9, 9, generator=g).to(device)
    ref = torch.nn.BatchNorm2d(8).to(device)
    y = ref(x)
    y.backward(dy)
    got = [torch.load(out / f"sync{r}.pt") for r in range(2)]

    def err(a, b):
        return float((a - b.detach().cpu()).abs().max() / b.detach().abs().max().clamp_min(1e-30))

    errors = {"y": err(torch.cat([g_["y"] for g_ in got]), y),
              "dx": err(torch.cat([g_["dx"] for g_ in got]), x.grad),
              "dweight": err(got[0]["dw"] + got[1]["dw"], ref.weight.grad),
              "running_mean": max(err(g_["rm"], ref.running_mean) for g_ in got)}
    run = subprocess.run([sys.executable, "-m", "bnlab.cli", "train", "--engine", "torch",
                          "--device", device, "--dataset", "digits", "--steps", "30",
                          "--no-progress", "--out", str(out / "train-run")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return {"sync_backend": backend, "sync_backend_why": why, "sync_errors": errors,
            "sync_ok": all(v < 1e-4 for v in errors.values()),
            "train_returncode": run.returncode, "train_output": (run.stdout + run.stderr)[-1500:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--budget", type=float, default=270.0, help="seconds (default 270)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench time per candidate")
    p.add_argument("--skip-distributed", action="store_true",
                   help="skip the 2-process SyncBatchNorm and training checks")
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from bnlab import bench_gpu
    import gpu_cases as checks  # beside this script

    # "skipped": not run on request (--skip-distributed, the large cases in a CPU dry run);
    # "over_budget": not run for lack of time, so not passing
    report = {"environment": bench_gpu.environment(args.device), "checks": [], "skipped": [],
              "over_budget": [], "errors": [], "phases": {}}

    def save():
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        bench_gpu.write_json(report, out / "gpu_check.json")

    def check(cases, phase):
        t = time.perf_counter()
        for case in cases:
            if time.perf_counter() - start > args.budget:
                report["over_budget"].append(case.name)
                continue
            try:
                result = checks.run_case(case, args.device)
            except Exception:  # noqa: BLE001 - record and go on: one call, every figure
                report["errors"].append({"case": case.name, "error": traceback.format_exc()})
                save()
                continue
            report["checks"].append(result)
            flag = "ok " if result["ok"] else "BAD"
            worst = max(result["errors"], key=lambda k: result["errors"][k] / result["tolerances"][k])
            print(f"{flag} {result['case']:44s} worst {worst} {result['errors'][worst]:.2e} "
                  f"(tol {result['tolerances'][worst]:.1e})", flush=True)
            save()
        report["phases"][phase] = round(time.perf_counter() - t, 1)

    small = [c for c in checks.CASES if c.small]
    large = [c for c in checks.CASES if not c.small]
    check(small, "small checks")

    t = time.perf_counter()
    try:
        def on_row(result):
            report["bench"] = result
            save()

        bench = bench_gpu.run(args.device, rep_ms=args.rep_ms, on_row=on_row)
        report["bench"] = bench
        bench_gpu.write_json(bench, out / "bench-gpu.json")
        table = bench_gpu.format_table(bench)
        (out / "bench-gpu.txt").write_text(table + "\n")
        print(table, flush=True)
    except Exception:  # noqa: BLE001
        report["errors"].append({"case": "bench", "error": traceback.format_exc()})
        print(report["errors"][-1]["error"], flush=True)
    report["phases"]["bench"] = round(time.perf_counter() - t, 1)
    save()

    t = time.perf_counter()
    try:
        if args.skip_distributed:
            raise _Skipped
        report["distributed"] = check_distributed(args.device, out)
        print(f"distributed: {json.dumps(report['distributed'])[:600]}", flush=True)
        if not report["distributed"]["sync_ok"] or report["distributed"]["train_returncode"]:
            report["errors"].append({"case": "distributed", "error": "see 'distributed'"})
    except _Skipped:
        report["skipped"].append("distributed")
    except Exception:  # noqa: BLE001
        report["errors"].append({"case": "distributed", "error": traceback.format_exc()})
    report["phases"]["distributed"] = round(time.perf_counter() - t, 1)
    save()

    if args.device == "cuda":
        check(large, "large checks")
        torch.cuda.synchronize()
    else:
        report["skipped"] += [c.name for c in large]
    report["all_ok"] = (all(r["ok"] for r in report["checks"]) and not report["errors"]
                        and not report["over_budget"])
    save()
    n_bad = sum(not r["ok"] for r in report["checks"])
    print(f"{len(report['checks'])} cases checked, {n_bad} bad, {len(report['errors'])} errors, "
          f"{len(report['over_budget'])} not run over budget (not passing), "
          f"{len(report['skipped'])} skipped on request; {report['elapsed_s']} s; phases "
          f"{json.dumps(report['phases'])}", flush=True)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
