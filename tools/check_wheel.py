"""Build bnlab's sdist and wheel and check the wheel outside the source tree.

    .venv/bin/python tools/check_wheel.py [--work DIR]      # `make check-wheel`

1. ``python -m build`` writes the sdist and the wheel into DIR/dist; the wheel must hold
   ``py.typed`` and the explain page's assets.
2. A fresh virtual environment gets the wheel with no extras. From an empty folder:
   ``import bnlab``, ``bnlab.batch_norm_forward``, ``bnlab.nn.BatchNorm2d``, ``bnlab
   --version`` and ``python -m bnlab --version`` work; ``bnlab steps`` (a lab command)
   exits with status 2 and one line naming ``bnlab[lab]``; ``import bnlab.torch`` raises
   an ImportError naming ``bnlab[torch]``.
3. The same environment gets ``[torch]`` (torch pinned to the tests' version, which is on
   this machine's disk): convert a torch model and take a training step.
4. Then ``[lab]``: ``bnlab steps`` runs and ``bnlab explain`` writes its page with assets.

Exit status 0 when everything holds; each failure is printed with what came.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"  # the tests' torch (pyproject's test extra): a CPU wheel on disk


def run(cmd, cwd=None, env=None, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(map(str, cmd))}\n{out.stdout[-3000:]}"
                         f"{out.stderr[-3000:]}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bnlab-wheel-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    failures = []

    def check(ok: bool, what: str, got: str = "") -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}" + ("" if ok else f": got {got[-800:]}"))
        if not ok:
            failures.append(what)

    dist = work / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)])
    wheels, sdists = sorted(dist.glob("bnlab-*.whl")), sorted(dist.glob("bnlab-*.tar.gz"))
    check(len(wheels) == 1 and len(sdists) == 1, "build: one wheel and one sdist",
          str(list(dist.iterdir())))
    wheel = wheels[0]
    names = zipfile.ZipFile(wheel).namelist()
    for need in ("bnlab/py.typed", "bnlab/explain/page.html", "bnlab/explain/app.js",
                 "bnlab/explain/style.css"):
        check(need in names, f"wheel holds {need}")
    check(any(n.startswith("bnlab/explain/vendor/") for n in names), "wheel holds Chart.js")

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--clear", str(venv)])
    py, bnlab_cmd = venv / "bin" / "python", venv / "bin" / "bnlab"
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    outside = work / "elsewhere"  # not the source tree: the wheel, not src/, is imported
    outside.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}

    # 2. no extras
    run([*pip, str(wheel)])
    core = textwrap.dedent("""
        import numpy as np, bnlab, bnlab.nn, pathlib
        assert "site-packages" in pathlib.Path(bnlab.__file__).parts, bnlab.__file__
        x = np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32)
        y, cache = bnlab.batch_norm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))
        assert abs(float(y.mean())) < 1e-5
        layer = bnlab.nn.BatchNorm2d(3)
        assert layer(x).shape == x.shape
        print(bnlab.__version__)
    """)
    out = run([str(py), "-c", core], cwd=outside, env=env, check=False)
    check(out.returncode == 0, "no extras: import bnlab, batch_norm_forward, nn.BatchNorm2d",
          out.stderr)
    version = out.stdout.strip()
    for cmd in ([str(bnlab_cmd), "--version"], [str(py), "-m", "bnlab", "--version"]):
        out = run(cmd, cwd=outside, env=env, check=False)
        check(out.returncode == 0 and out.stdout.strip() == f"bnlab {version}",
              f"{' '.join([Path(cmd[0]).name, *cmd[1:]])} says bnlab {version}", out.stdout + out.stderr)
    out = run([str(bnlab_cmd), "steps"], cwd=outside, env=env, check=False)
    lines = out.stderr.strip().splitlines()
    check(out.returncode == 2 and len(lines) == 1 and "pip install 'bnlab[lab]'" in lines[0],
          "no extras: `bnlab steps` exits 2 with one line naming bnlab[lab]", out.stderr)
    out = run([str(py), "-c", "import bnlab.torch"], cwd=outside, env=env, check=False)
    check(out.returncode != 0 and "pip install 'bnlab[torch]'" in out.stderr,
          "no extras: import bnlab.torch names bnlab[torch]", out.stderr)

    # 3. [torch]
    run([*pip, f"{wheel}[torch]", TORCH_PIN])
    step = textwrap.dedent("""
        import torch, bnlab.torch as bt
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                                  torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
        net = bt.convert(net)
        assert type(net[1]).__module__ == "bnlab.torch.batchnorm"
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,))
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        assert int(net[1].num_batches_tracked) == 1 and torch.isfinite(loss)
    """)
    out = run([str(py), "-c", step], cwd=outside, env=env, check=False)
    check(out.returncode == 0, "[torch]: convert a model and take a training step", out.stderr)

    # 4. [lab]
    run([*pip, f"{wheel}[lab]", TORCH_PIN])
    out = run([str(bnlab_cmd), "steps", "--batch-size", "8"], cwd=outside, env=env,
              check=False)
    check(out.returncode == 0 and "variance" in out.stdout.lower(), "[lab]: bnlab steps",
          out.stdout + out.stderr)
    out = run([str(bnlab_cmd), "explain", "--out", str(outside / "explain")], cwd=outside,
              env=env, check=False)
    page = outside / "explain" / "explain.html"
    text = page.read_text() if page.exists() else ""
    check(out.returncode == 0 and page.exists() and "new Chart" in text and len(text) > 50_000,
          "[lab]: bnlab explain writes its page with the assets inlined",
          out.stdout + out.stderr)
    print(f"{len(failures)} failure(s); {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
