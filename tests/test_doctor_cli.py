"""``bnlab doctor FILE`` (issue 14): bnlab checkpoints and PyTorch state dicts, the table and
--json, what is skipped without --model, and files that are refused or damaged."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnlab import cli, models  # noqa: E402
from bnlab.torch.models import twin  # noqa: E402
from bnlab.train import read_checkpoint, save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint: `bnlab train` of the seed CNN on the embedded digits, 40 steps."""
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--steps", "40", "--no-progress", "--out", str(out)]) == 0
    return out / "checkpoint.npz"


def run(capsys, *argv):
    code = cli.main(["doctor", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def spoiled_npz(checkpoint, tmp_path):
    """The checkpoint after a mixed-precision overflow step: a NaN in layer 5's running
    variance (written as save_checkpoint writes, since bnlab models refuse to hold NaN)."""
    state, _, meta = read_checkpoint(checkpoint)
    net = models.seed_cnn()
    net.load_state_dict(state)
    path = save_checkpoint(tmp_path / "spoiled.npz", net, **meta)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["model/5.running_var"][3] = np.nan
    np.savez(path, **arrays)
    return path


def test_a_clean_checkpoint_has_no_findings_and_says_what_was_skipped(checkpoint, capsys):
    code, out, _ = run(capsys, checkpoint)
    assert code == 0 and "no findings" in out and "2 BN layers" in out
    for skipped in ("bias-before-bn", "small-batch", "stale-stats", "keras-momentum",
                    "mixed-mode", "frozen-train"):
        assert f"skipped {skipped}:" in out
    code, out, _ = run(capsys, checkpoint, "--model", "seed-cnn", "--batches", "2")
    assert code == 0 and "no findings" in out and "seed-cnn on mnist-5k" in out
    assert "skipped stale-stats" not in out and "skipped bias-before-bn" not in out


def test_a_nan_in_the_running_variance_is_an_error_in_the_table_and_the_json(
        checkpoint, tmp_path, capsys):
    path = spoiled_npz(checkpoint, tmp_path)
    code, out, _ = run(capsys, path, "--json", tmp_path / "findings.json")
    assert code == 1
    head = next(line for line in out.splitlines() if line.startswith("severity"))
    assert head.split() == ["severity", "layer", "code", "message", "evidence", "fix"]
    row = next(line for line in out.splitlines() if "nonfinite-stats" in line)
    assert row.split()[:3] == ["error", "5", "nonfinite-stats"]
    report = json.loads((tmp_path / "findings.json").read_text())
    assert [(f["code"], f["layer"], f["severity"]) for f in report["findings"]] == [
        ("nonfinite-stats", "5", "error")]
    assert report["findings"][0]["evidence"] == {"nonfinite_running_var": 1}
    code, out, _ = run(capsys, path, "--model", "seed-cnn")  # bnlab models do not load NaN
    assert code == 1 and "nonfinite-stats" in out
    assert "skipped stale-stats: bnlab models do not load NaN/inf (5.running_var)" in out


def test_a_torch_state_dict_with_the_model_gets_the_dynamic_checks(checkpoint, tmp_path, capsys):
    state, _, _ = read_checkpoint(checkpoint)
    net = twin(models.seed_cnn())
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    sd = net.state_dict()
    sd["1.running_mean"] += 5.0  # stale: 5 units off
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "model.pt")
    code, out, _ = run(capsys, tmp_path / "model.pt", "--model", "seed-cnn", "--batches", "2",
                       "--json", tmp_path / "f.json")
    assert code == 0  # warnings only
    found = {(f["code"], f["layer"]) for f in json.loads((tmp_path / "f.json").read_text())[
        "findings"]}
    assert found == {("stale-stats", "1")}
    assert "accuracy_running_stats" in out
    code, out, _ = run(capsys, tmp_path / "model.pt")  # static only: nothing to see
    assert code == 0 and "no findings" in out


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(checkpoint, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    net = twin(models.seed_cnn())
    torch.save({"state_dict": net.state_dict(), "payload": _RunsCode(marker)},
               tmp_path / "evil.pt")
    code, out, err = run(capsys, tmp_path / "evil.pt")
    assert code == 2 and "refused" in err and "could run code" in err
    assert "nothing in it was run" in err
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_a_damaged_file_is_a_clear_error(checkpoint, tmp_path, capsys, suffix):
    if suffix == ".npz":
        data = checkpoint.read_bytes()
    else:
        torch.save(twin(models.seed_cnn()).state_dict(), tmp_path / "ok.pt")
        data = (tmp_path / "ok.pt").read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, bad)
    assert code == 2 and "damaged" in err and str(bad) in err


def test_bad_arguments_are_clear_errors(checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "missing.npz")
    assert code == 2 and "does not exist" in err
    (tmp_path / "weights.h5").write_bytes(b"x")
    code, _, err = run(capsys, tmp_path / "weights.h5")
    assert code == 2 and ".npz" in err and ".pt" in err
    code, _, err = run(capsys, checkpoint, "--data", "digits")
    assert code == 2 and "--data needs --model" in err
    code, _, err = run(capsys, checkpoint, "--model", "paper-mlp")
    assert code == 2 and "does not fit --model paper-mlp" in err
