"""The bnlab command: help, option errors, and small real runs."""

import json
import subprocess
import sys

import pytest

import numpy as np

from bnlab import cli
from bnlab.experiments import four_steps


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bnlab.cli", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("command", [[], ["steps"], ["train"], ["compare"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(command + ["--help"])
    assert e.value.code == 0
    assert "usage: bnlab" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["compare", "--lr", "-1"], "expected a positive finite number"),
    (["compare", "--epochs", "0"], "expected a positive integer"),
    (["compare", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "--momentum", "1.5"], "expected a number in [0, 1]"),
    (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["compare", "--bogus"], "unrecognized arguments: --bogus"),
    (["dance"], "invalid choice: 'dance'"),
])
def test_bad_options_are_rejected_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_writes_its_run_folder(tmp_path):
    out = tmp_path / "run"
    r = run_cli("compare", "--dataset", "digits", "--steps", "30", "--eval-every", "10",
                "--batch-size", "32", "--lr", "0.1", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "with BN" in r.stdout and "steps to 95% test accuracy" in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"bn", "plain"}
    for run in results["runs"].values():
        assert run["eval_step"] == [10, 20, 30] and len(run["test_accuracy"]) == 3
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "learning_curves.png" in (out / "report.md").read_text()


def test_train_then_init_from_its_checkpoint(tmp_path):
    first = tmp_path / "a"
    r = run_cli("train", "--model", "mlp", "--dataset", "digits", "--steps", "20",
                "--no-progress", "--out", str(first))
    assert r.returncode == 0, r.stderr
    assert (first / "checkpoint.npz").exists() and "test accuracy" in r.stdout
    r = run_cli("train", "--model", "mlp", "--dataset", "digits", "--steps", "5", "--no-progress",
                "--init-from", str(first / "checkpoint.npz"), "--out", str(tmp_path / "b"))
    assert r.returncode == 0 and "initialized from" in r.stdout
    r = run_cli("train", "--model", "cnn", "--dataset", "digits", "--steps", "5", "--no-progress",
                "--init-from", str(first / "checkpoint.npz"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "does not fit this model" in r.stderr


def test_steps_checks_the_hand_computation_against_the_library(capsys, monkeypatch):
    assert cli.main(["steps", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "1. mini-batch mean" in out and "4. scale and shift" in out and "the same y" in out
    # a library off by 1e-4 (a planted bug) makes the command fail
    real = four_steps.F.batch_norm_forward

    def off_by_a_little(*args, **kwargs):
        y, cache = real(*args, **kwargs)
        return y + np.float32(1e-4), cache

    monkeypatch.setattr(four_steps.F, "batch_norm_forward", off_by_a_little)
    assert cli.main(["steps", "--batch-size", "16"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert cli.main(["steps", "--batch-size", "1"]) == 2
    assert "at least 2 digits" in capsys.readouterr().err


def test_steps_numbers_are_the_batch_statistics():
    """The printed steps are the mean, variance, x_hat and y of the batch, per pixel."""
    r = four_steps.run(batch_size=32, seed=3, out=lambda *a: None)
    x = four_steps._load_batch(32, 3)[:, [350, 380, 430, 460]].astype(np.float64)
    np.testing.assert_allclose(r["mean"], x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(r["var"], x.var(axis=0), rtol=1e-12)
    z = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(r["y"], 2.0 * z + 0.5, rtol=1e-12, atol=1e-12)
    assert r["ok"] and r["max_abs_diff"] <= r["tolerance"] < 1e-5


def test_errors_are_one_line_unless_the_traceback_is_asked_for(capsys, monkeypatch):
    assert cli.main(["bench", "--device", "cuda", "--repeats", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repeats applies to the CPU bench only" in err
    assert "--debug or BNLAB_DEBUG=1" in err
    with pytest.raises(ValueError, match="--repeats applies to the CPU bench only"):
        cli.main(["--debug", "bench", "--device", "cuda", "--repeats", "3"])
    monkeypatch.setenv("BNLAB_DEBUG", "1")
    with pytest.raises(ValueError, match="--no-cnn applies to the CPU bench only"):
        cli.main(["bench", "--device", "cuda", "--no-cnn"])


@pytest.mark.parametrize("args,message", [
    (["--repeats", "5"], "--repeats applies to the CPU bench only"),
    (["--no-cnn"], "--no-cnn applies to the CPU bench only"),
    (["--dtypes", "float64"], "no GPU case in float64"),
])
def test_gpu_bench_refuses_what_it_would_ignore(args, message, capsys):
    """bnlab bench --device cuda used to ignore --dtypes, --repeats and --no-cnn."""
    assert cli.main(["bench", "--device", "cuda", *args]) == 2
    assert message in capsys.readouterr().err


def test_gpu_bench_takes_dtypes(monkeypatch, capsys):
    from bnlab import bench_gpu

    seen = {}
    monkeypatch.setattr(bench_gpu, "run", lambda device, cases, progress: seen.update(
        cases=cases) or {"rows": []})
    monkeypatch.setattr(bench_gpu, "format_table", lambda result: "table")
    assert cli.main(["bench", "--device", "cuda", "--dtypes", "bfloat16", "float16"]) == 0
    assert {c.dtype for c in seen["cases"]} == {"bfloat16", "float16"}
