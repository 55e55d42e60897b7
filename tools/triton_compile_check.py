"""Compile every Triton kernel launch bnlab makes for a GPU, without a GPU.

Triton's interpreter (how ``make test`` runs the kernels) accepts some programs the GPU
compiler rejects, and it says nothing about speed. This tool runs bnlab's host code
(``bnlab.kernels.triton_bn``) on ``meta`` tensors of the given cases, records each kernel
launch instead of running it, specializes the arguments as Triton's launcher would
(integers equal to 1 become constants, multiples of 16 are marked divisible, unless the
kernel says ``do_not_specialize``) and compiles each distinct launch down to a cubin for
the target (default ``cuda:90``, an H100). For each launch it reports the vectorized global
loads and stores (``ld/st.global.v4`` or ``.v2``) in the PTX: the memory-bound passes must
use them.

    .venv/bin/python tools/triton_compile_check.py             # the GPU bench's cases
    .venv/bin/python tools/triton_compile_check.py --json FILE

Run without ``TRITON_INTERPRET=1`` (the kernels must be compiled, not interpreted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

_POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "float64": "*fp64",
            "int32": "*i32", "int64": "*i64", "uint8": "*u8"}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **meta)`` records the call."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.calls.append((self.fn, grid, args, meta))
        return launch


def _specialize(fn, args, meta):
    """(signature, constexprs, attrs) as Triton's launcher specializes this call."""
    import torch

    names = fn.arg_names
    skip = {names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    meta = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = meta[name] if name in meta else args[i]
        if name in meta or value is None or fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER[str(value.dtype).removeprefix("torch.")]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh allocations are aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and name not in skip:
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in skip:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value)}")
    return signature, constexprs, attrs


def launches(cases, multiprocessors: int):
    """Every kernel launch of a training step (forward with the update, backward) and an
    evaluation step (forward, backward) for each case, without and with the fused ReLU, and
    with BN + add + ReLU: [(case, fn, grid, args, meta)]."""
    import torch

    from bnlab.kernels import triton_bn as tb

    calls, out = [], []
    saved = {}
    kernels = [k for k in dir(tb) if k.endswith("_kernel")]
    for name in kernels:
        saved[name] = getattr(tb, name)
        setattr(tb, name, _Recorder(saved[name], calls))
    tb.clear_caches()  # geometries are cached by shape: make them with this SM count
    saved_check, saved_mp = tb.check_device, tb.multiprocessors
    tb.check_device = lambda x: None
    tb.multiprocessors = lambda device: multiprocessors
    try:
        for case in cases:
            dtype = getattr(torch, case.dtype)
            fmt = torch.channels_last if case.fmt == "channels_last" else torch.contiguous_format
            x = torch.empty(case.shape, dtype=dtype, device="meta").contiguous(memory_format=fmt)
            C = case.shape[1]
            w, b, rm, rv = (torch.empty(C, device="meta") for _ in range(4))
            nbt = torch.empty((), dtype=torch.long, device="meta")
            calls.clear()
            for act in ("identity", "relu"):  # BN, and BatchNormAct2d's fused ReLU
                _, mean, var, inv_std = tb.train_forward(x, w, b, 1e-5, rm, rv, nbt, 0.1, act)
                tb.backward(x, x, mean, inv_std, w, True, b, act)
                _, mean, inv_std = tb.inference(x, rm, rv, w, b, 1e-5, act)
                tb.backward(x, x, mean, inv_std, w, False, b, act)
            for training in (True, False):  # BatchNormAddAct2d: BN + add + ReLU, 1-bit mask
                stats = (None, None, rm, rv) if training else (rm, rv, None, None)
                _, mean, inv_std, bits = tb.add_act_forward(x, x, w, b, 1e-5, training, *stats,
                                                            nbt, 0.1, "relu")
                tb.backward(x, x, mean, inv_std, w, training, b, "identity", bits)
            out += [(case, *call) for call in calls]
    finally:
        for name in kernels:
            setattr(tb, name, saved[name])
        tb.check_device, tb.multiprocessors = saved_check, saved_mp
        tb.clear_caches()
    return out


def compile_all(cases, target: str = "cuda:90", multiprocessors: int = 132,
                progress: bool = True) -> list[dict]:
    """Compile every distinct launch of ``cases``; one dict per launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    backend, arch = target.split(":")
    gpu = GPUTarget(backend, int(arch), 32)
    seen, rows = {}, []
    for case, fn, grid, args, meta in launches(cases, multiprocessors):
        signature, constexprs, attrs = _specialize(fn, args, meta)
        key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
               repr(sorted(attrs)), meta.get("num_warps", 4))
        if key not in seen:
            t = time.perf_counter()
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu,
                                      options={"num_warps": meta.get("num_warps", 4)})
            ptx = compiled.asm["ptx"]
            seen[key] = {"seconds": round(time.perf_counter() - t, 2),
                         "ld_v4": ptx.count("ld.global.v4"), "ld_v2": ptx.count("ld.global.v2"),
                         "ld": ptx.count("ld.global"), "st_v4": ptx.count("st.global.v4"),
                         "st_v2": ptx.count("st.global.v2"), "st": ptx.count("st.global"),
                         "cubin_bytes": len(compiled.asm["cubin"])}
        row = {"case": case.name, "kernel": fn.__name__, "grid": list(grid), **seen[key],
               "constexprs": {fn.arg_names[i[0]]: v for i, v in constexprs.items()
                              if fn.arg_names[i[0]] in meta}}
        rows.append(row)
        if progress:
            print(f"{case.name:30s} {fn.__name__:24s} grid {str(list(grid)):12s} loads "
                  f"{row['ld']:3d} (v4 {row['ld_v4']}, v2 {row['ld_v2']})  stores {row['st']:3d} "
                  f"(v4 {row['st_v4']}, v2 {row['st_v2']})", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="cuda:90", help="backend:arch, default cuda:90 (H100)")
    p.add_argument("--multiprocessors", type=int, default=132, help="default 132 (H100 SXM)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    from bnlab import bench_gpu

    rows = compile_all(bench_gpu.CASES, args.target, args.multiprocessors)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{len(rows)} launches, {len({(r['kernel'], r['cubin_bytes']) for r in rows})} "
          f"distinct compilations, all compiled for {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
