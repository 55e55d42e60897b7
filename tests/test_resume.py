"""Resumable training (NumPy engine): a run killed at any point and resumed with --resume
ends with the same weights, running statistics and history as the uninterrupted run (bit
for bit), and a write that fails midway leaves the previous checkpoint loadable."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bnlab import data, nn, train
from bnlab.experiments import single

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
ARGS = ["train", "--model", "mlp", "--dataset", "digits", "--steps", "300",
        "--checkpoint-every", "10", "--no-progress"]


def bnlab(*args, **kw):
    return subprocess.run([sys.executable, "-m", "bnlab", *args], env=ENV, capture_output=True,
                          text=True, timeout=180, **kw)


def outcome(folder: Path):
    results = json.loads((folder / "results.json").read_text())
    runs = {k: {f: v for f, v in h.items() if f != "seconds"} for k, h in
            results["runs"].items()}
    with np.load(folder / "checkpoint.npz") as f:
        weights = {k: f[k] for k in f.files if k.startswith("model/")}
    return runs, weights, results.get("resumed_from")


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    full = tmp_path / "full"
    assert bnlab(*ARGS, "--out", str(full)).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bnlab", *ARGS, "--out", str(killed)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / single.RESUME).exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # mid-run, no chance to clean up
    proc.wait(timeout=30)
    assert not (killed / "results.json").exists(), "killed before the end"
    out = bnlab("train", "--resume", str(killed), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout
    runs, weights, resumed = outcome(killed)
    want_runs, want_weights, _ = outcome(full)
    assert runs == want_runs  # every loss, accuracy and evaluation, as floats
    assert weights.keys() == want_weights.keys()
    for k in weights:  # running statistics included
        assert np.array_equal(weights[k], want_weights[k]), k
    assert len(resumed) == 1 and 10 <= resumed[0] < 300


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_resumes_exactly_with_momentum_dropout_and_bn(optimizer):
    """fit() itself, from a state taken at step 20 of 40: a model with dropout (its own
    generator), BN, and an optimizer with state."""
    ds = data.load("digits")

    def model():
        rng = np.random.default_rng(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32, bias=False, rng=rng),
                             nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                             nn.Linear(32, 10, rng=rng))

    kw = dict(steps=40, lr=0.05, batch_size=32, optimizer=optimizer, momentum=0.9,
              progress=False, eval_every=10, seed=3)
    m_full = model()
    h_full = train.fit(m_full, ds, **kw)
    saved = {}

    def capture(state):
        if state["step"] == 20:
            saved.update(state=copy.deepcopy(state), model=copy.deepcopy(m_half.state_dict()))

    m_half = model()
    train.fit(m_half, ds, checkpoint=capture, checkpoint_every=10, **kw)
    m_resumed = model()
    m_resumed.load_state_dict(saved["model"])
    h = train.fit(m_resumed, ds, resume=saved["state"], **kw)
    a, b = h.to_dict(), h_full.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    for (k, v), w in zip(m_resumed.state_dict().items(), m_full.state_dict().values()):
        assert np.array_equal(v, w), k


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Disk full (or a kill) while the next checkpoint is written: the last complete one is
    still there and loads; no partial file is left behind."""
    folder = tmp_path / "run"
    calls = []
    real = np.savez

    def flaky(f, **arrays):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(f, **arrays)

    monkeypatch.setattr(np, "savez", flaky)
    config = single.TrainConfig(model="mlp", dataset="digits", steps=60)
    with pytest.raises(OSError, match="No space left"):
        single.run(config, out=folder, progress=False, checkpoint_every=20,
                   print_fn=lambda *a: None)
    state, optim, meta = train.read_checkpoint(folder / single.RESUME)
    assert meta["resume"]["step"] == 20
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.setattr(np, "savez", real)
    results = single.run(config, resume=folder, progress=False, print_fn=lambda *a: None)
    assert results["resumed_from"] == [20]
    assert results["runs"]["bn"]["step"][-1] == 60


# --- the torch engine, and torchrun restarting a killed worker ------------------------------

TORCH = ["train", "--engine", "torch", "--model", "mlp", "--dataset", "digits", "--steps",
         "150", "--checkpoint-every", "10", "--no-progress"]


def _wait_for(path: Path, proc, seconds=120):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, "finished before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.005)


def test_torch_engine_killed_and_resumed(tmp_path):
    full = tmp_path / "full"
    assert bnlab(*TORCH, "--out", str(full)).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bnlab", *TORCH, "--out", str(killed)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(killed / "resume.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    out = bnlab("train", "--engine", "torch", "--resume", str(killed), "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    runs, weights, resumed = outcome(killed)
    want_runs, want_weights, _ = outcome(full)
    assert runs == want_runs and resumed and 10 <= resumed[0] < 150
    for k in weights:
        assert np.array_equal(weights[k], want_weights[k]), k


def _workers(parent: int) -> list[int]:
    """torchrun's worker processes (children of ``parent`` running bnlab.cli)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"bnlab.cli" in cmdline:
            found.append(int(stat.parent.name))
    return found


def test_torchrun_restarts_a_killed_worker_and_the_run_resumes(tmp_path):
    """Two processes under torchrun --max-restarts 1: a worker SIGKILLed mid-run, torchrun
    restarts the group, which resumes from the last checkpoint by itself and ends as the
    uninterrupted torchrun run."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))

    def launch(out):
        from bnlab.torch import distributed

        return subprocess.Popen(
            [torchrun, "--nproc-per-node", "2", "--max-restarts", "1", "--master-addr",
             "127.0.0.1", "--master-port", str(distributed.free_port()), "-m", "bnlab.cli",
             *TORCH, "--out", str(out)],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    full = launch(tmp_path / "full")
    _, err = full.communicate(timeout=180)
    assert full.returncode == 0, err[-2000:]
    run = launch(tmp_path / "killed")
    _wait_for(tmp_path / "killed" / "resume.pt", run)
    victims = _workers(run.pid)
    assert victims, "torchrun's workers"
    os.kill(victims[-1], signal.SIGKILL)
    _, err = run.communicate(timeout=180)
    assert run.returncode == 0, err[-3000:]
    runs, weights, resumed = outcome(tmp_path / "killed")
    want_runs, want_weights, _ = outcome(tmp_path / "full")
    assert resumed, "the restarted job resumed"
    assert runs == want_runs
    for k in weights:
        assert np.array_equal(weights[k], want_weights[k]), k
