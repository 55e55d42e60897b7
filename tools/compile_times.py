"""Time the numba kernels' compilation and cache loading (docs/performance.md, "Compilation").

Each measurement is a fresh Python process pointed at an empty ``NUMBA_CACHE_DIR``:

1. ``cold_first``: the first NCHW float32 training forward + backward and inference: the
   kernels a first user call compiles;
2. ``cold_all``: every layout (NCHW, NHWC, (N, C)) and dtype (float32, float64), training
   forward + backward and inference: everything there is to compile;
3. ``warm_all``: the same again in a new process, loading what step 2 cached.

Each process reports the seconds spent in ``import bnlab.kernels.numba_bn`` (numba's
import) and in the kernel calls. Usage, from the repository root:

    .venv/bin/python tools/compile_times.py [--json docs/compile_times.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from bnlab.kernels import numba_bn  # imports numba
from bnlab import functional as F
t1 = time.perf_counter()
cases = {"first": [((4, 3, 5, 5), 1, np.float32)],
         "all": [(s, a, d) for s, a in (((4, 3, 5, 5), 1), ((4, 5, 5, 3), -1), ((8, 3), 1))
                 for d in (np.float32, np.float64)]}[sys.argv[1]]
for shape, axis, dtype in cases:
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    C = shape[axis]
    y, cache = F.batch_norm_forward(x, np.ones(C, dtype), np.zeros(C, dtype), axis=axis,
                                    backend="numba")
    F.batch_norm_backward(np.ones_like(x), cache, backend="numba")
    F.batch_norm_inference(x, np.zeros(C, dtype), np.ones(C, dtype), None, None, axis=axis,
                           backend="numba")
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "kernels_s": t2 - t1}))
"""


def measure(which: str, cache_dir: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", CHILD, which], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="docs/compile_times.json", help="where to write the result")
    args = p.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as every:
        result["cold_first"] = measure("first", first)
        result["cold_all"] = measure("all", every)
        result["warm_all"] = measure("all", every)
    import numba
    import numpy

    result["environment"] = {"python": platform.python_version(), "numba": numba.__version__,
                             "numpy": numpy.__version__, "cpus": os.cpu_count(),
                             "machine": platform.machine()}
    text = json.dumps(result, indent=1)
    print(text)
    with open(args.json, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
