"""Run folders and typed experiment configurations shared by the experiments."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .. import report
from ..train import atomic_write


def run_dir(out, prefix: str) -> Path:
    """``out`` if given, else ``runs/<prefix>-<YYYYmmdd-HHMMSS>``; created."""
    path = Path(out) if out else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment() -> dict:
    import bnlab

    return {
        "bnlab": bnlab.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def write_json(path, obj) -> Path:
    text = json.dumps(obj, indent=1, default=_jsonable)
    return atomic_write(path, lambda f: f.write(text.encode()))


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def finish(results: dict, out, prefix: str, print_fn=print) -> dict:
    """Write results.json, the figures and report.md into the run folder; print the
    experiment's table and what was written."""
    folder = run_dir(out, prefix)
    write_json(folder / "results.json", results)
    written = report.write_report(results, folder)
    print_fn(report.summary(results))
    print_fn("\nwrote " + ", ".join(str(folder / name) for name in ["results.json"] + written))
    results["run_dir"] = str(folder)
    return results
