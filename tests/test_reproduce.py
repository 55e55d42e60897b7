"""The paper's experiments at a tiny size: structure, figures, repeatability, reports."""

import json
import subprocess
import sys

import numpy as np
import pytest

from bnlab import cli, data, models, nn, report
from bnlab.experiments import reproduce as R
from bnlab.train import fit

PNG = b"\x89PNG\r\n\x1a\n"


def load(folder):
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def fig1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig1")
    config = R.Fig1Config(dataset="digits", steps=60, eval_every=20, probe_every=10,
                          probe_size=200, lr=0.5, unit=7)
    R.run_fig1(config, out=out, progress=False, print_fn=lambda *a: None)
    return out, config


def test_fig1_results_structure_and_figures(fig1_run):
    out, config = fig1_run
    results = load(out)
    assert results["experiment"] == "fig1" and set(results["runs"]) == {"bn", "plain"}
    for run in results["runs"].values():
        assert run["steps"] == [20, 40, 60]
        assert len(run["test_accuracy"]) == 3 and all(0 <= a <= 1 for a in run["test_accuracy"])
        assert run["probe_steps"] == [1, 10, 20, 30, 40, 50, 60]
        assert set(run["percentiles"]) == {"15", "50", "85"}
        assert all(len(v) == len(run["probe_steps"]) for v in run["percentiles"].values())
        assert set(run["stability"]["50"]) == {"range", "std"}
    assert (out / "fig1.png").read_bytes()[:8] == PNG
    text = (out / "report.md").read_text()
    assert "fig1.png" in text and "15th percentile range" in text and "Command:" in text


def test_fig1_percentiles_are_those_of_the_probed_unit(fig1_run):
    """The last probe's percentiles are np.percentile of unit ``unit``'s input to the last
    sigmoid over the probe images, recomputed from a network trained the same way."""
    out, config = fig1_run
    results = load(out)
    digits = data.load(config.dataset)
    probe_x = digits.test[0][:config.probe_size]
    for name, bn in (("bn", True), ("plain", False)):
        model = models.paper_mlp(bn=bn, activation="sigmoid", in_features=probe_x[0].size,
                                 num_classes=digits.num_classes, weight_std=config.weight_std,
                                 seed=config.seed)
        fit(model, digits, steps=config.steps, lr=config.lr, batch_size=config.batch_size,
            seed=config.seed, eval_every=config.eval_every, progress=False)
        model.eval()
        layers = list(model)
        last = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Sigmoid))
        h = probe_x
        for layer in layers[:last]:   # Flatten, (Linear, [BN], Sigmoid) x 2, Linear, [BN]
            h = layer(h)
        expected = np.percentile(h[:, config.unit], [15, 50, 85])
        run = results["runs"][name]
        assert run["probe_steps"][-1] == config.steps
        got = [run["percentiles"][p][-1] for p in ("15", "50", "85")]
        np.testing.assert_array_equal(got, expected)


def test_fig1_is_bit_for_bit_repeatable(fig1_run, tmp_path):
    out, config = fig1_run
    R.run_fig1(config, out=tmp_path, progress=False, print_fn=lambda *a: None)
    first, second = load(out), load(tmp_path)
    for name in ("bn", "plain"):
        for key in ("test_accuracy", "test_loss", "percentiles", "train_loss_every_100"):
            assert first["runs"][name][key] == second["runs"][name][key]


def test_probe_reads_the_input_of_the_last_sigmoid():
    model = models.paper_mlp(bn=True, in_features=16, seed=3)
    x = np.random.default_rng(0).random((5, 16)).astype(np.float32)
    z = R.last_sigmoid_input(model, x)
    model.eval()
    expected = x
    for layer in list(model)[:9]:  # Flatten, then 3 x (Linear, BN, Sigmoid) minus the last sigmoid
        expected = layer(expected)
    np.testing.assert_array_equal(z, expected)
    assert z.shape == (5, 100)


@pytest.mark.parametrize("experiment,config,key,values,figure", [
    ("lr-sweep", R.LrSweepConfig(dataset="digits", lrs=(0.1, 50.0), steps=30, eval_every=10),
     "lr", [0.1, 50.0], "lr_sweep.png"),
    ("init-sweep", R.InitSweepConfig(dataset="digits", weight_stds=(0.05, 5.0), steps=30,
                                     eval_every=10), "weight_std", [0.05, 5.0], "init_sweep.png"),
])
def test_sweeps_write_every_cell(experiment, config, key, values, figure, tmp_path):
    runner = R.run_lr_sweep if experiment == "lr-sweep" else R.run_init_sweep
    runner(config, out=tmp_path, progress=False, print_fn=lambda *a: None)
    results = load(tmp_path)
    assert results["experiment"] == experiment
    cells = {(r["activation"], r["bn"], r[key]) for r in results["runs"]}
    assert cells == {(a, bn, v) for a in ("sigmoid", "relu") for bn in (False, True) for v in values}
    for run in results["runs"]:
        assert isinstance(run["diverged"], bool) and 0 <= run["final_test_accuracy"] <= 1
    assert (tmp_path / figure).read_bytes()[:8] == PNG
    assert "final test accuracy" in (tmp_path / "report.md").read_text()


def test_lr_sweep_detects_divergence_of_the_plain_relu_net(tmp_path):
    config = R.LrSweepConfig(dataset="digits", lrs=(50.0,), activations=("relu",), steps=40,
                             eval_every=20, weight_std=1.0)
    results = R.run_lr_sweep(config, out=tmp_path, progress=False, print_fn=lambda *a: None)
    plain = next(r for r in results["runs"] if not r["bn"])
    assert plain["diverged"] and plain["stopped_at"] < 40


def test_report_regenerates_from_results_json(fig1_run, tmp_path):
    out, _ = fig1_run
    (tmp_path / "results.json").write_bytes((out / "results.json").read_bytes())
    assert report.regenerate(tmp_path) == ["fig1.png", "report.md"]
    assert (tmp_path / "fig1.png").read_bytes()[:8] == PNG
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()


def test_report_errors(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a bnlab run folder" in capsys.readouterr().err
    (tmp_path / "results.json").write_text("{not json")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "results.json").write_text('{"experiment": "fig9"}')
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "expected one of" in capsys.readouterr().err


def test_reproduce_cli_writes_into_out(tmp_path):
    out = tmp_path / "f"
    r = subprocess.run([sys.executable, "-m", "bnlab.cli", "reproduce", "fig1", "--steps", "30",
                        "--dataset", "digits", "--eval-every", "10", "--no-progress",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "test accuracy at step" in r.stdout
    assert load(out)["runs"]["bn"]["steps"] == [10, 20, 30]


@pytest.mark.parametrize("args,message", [
    (["reproduce", "fig1", "--unit", "100"], "unit must be one of the 100"),
])
def test_reproduce_bad_values(args, message, capsys):
    assert cli.main(args + ["--steps", "1", "--dataset", "digits", "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["reproduce", "fig9"], ["reproduce", "lr-sweep", "--lrs", "0"],
                                  ["reproduce", "init-sweep", "--weight-stds", "-1"]])
def test_reproduce_option_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2


@pytest.mark.parametrize("name", ["fig1", "lr-sweep", "init-sweep"])
def test_reproduce_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", name, "--help"])
    assert e.value.code == 0 and "--steps" in capsys.readouterr().out


def test_small_batch_structure_summary_and_report(tmp_path):
    """Every (variant, batch size, seed) trained on the same samples; the summary's means
    and spreads are those of the runs; the figure and report are written."""
    config = R.SmallBatchConfig(dataset="digits", batch_sizes=(2, 8), seeds=(0, 1),
                                samples=64)
    out = tmp_path / "sb"
    result = R.run_small_batch(config, out=out, progress=False, print_fn=lambda *a: None)
    runs = load(out)["runs"]
    assert len(runs) == 2 * 3 * 2
    assert {(r["variant"], r["batch_size"]) for r in runs} == {
        (v, b) for v in ("bn", "ghost", "renorm") for b in (2, 8)}
    assert all(r["steps"] * r["batch_size"] == 64 for r in runs)
    assert all(r["lr"] == pytest.approx(0.1 * r["batch_size"] / 32) for r in runs)
    for row in result["summary"]:
        accs = [r["eval_accuracy"] for r in runs
                if (r["variant"], r["batch_size"]) == (row["variant"], row["batch_size"])]
        assert row["eval_accuracy"] == pytest.approx(np.mean(accs))
        assert row["eval_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
        gaps = [r["batch_stats_accuracy"] - r["eval_accuracy"] for r in runs
                if (r["variant"], r["batch_size"]) == (row["variant"], row["batch_size"])]
        assert row["train_eval_gap"] == pytest.approx(np.mean(gaps))
    assert (out / "small_batch.png").read_bytes().startswith(PNG)
    assert "batch renorm" in (out / "report.md").read_text()


def test_small_batch_swaps_the_bn_layers_and_keeps_parameters():
    config = R.SmallBatchConfig(virtual_batch_size=2)
    net = models.seed_cnn(seed=3)
    gammas = [m.weight.data.copy() for m in net if isinstance(m, nn.BatchNorm2d)]
    ghost = R.with_variant(models.seed_cnn(seed=3), "ghost", config)
    renorm = R.with_variant(models.seed_cnn(seed=3), "renorm", config)
    assert [type(m).__name__ for m in ghost].count("GhostBatchNorm2d") == 2
    assert [type(m).__name__ for m in renorm].count("BatchRenorm2d") == 2
    got = [m.weight.data for m in renorm if isinstance(m, nn.BatchRenorm2d)]
    assert all(np.array_equal(a, b) for a, b in zip(got, gammas))
    assert list(renorm.state_dict())[:2] == list(net.state_dict())[:2]


def test_regularization_structure_gap_and_summary(tmp_path):
    """BN on/off x dropout on/off per model and seed; the gap is train minus test accuracy
    at the end, the summary's means/spreads are the runs', the curves have one point per
    epoch, and the accuracies are those of evaluating the splits."""
    pytest.importorskip("torch")
    config = R.RegularizationConfig(dataset="digits", models=("mlp",), seeds=(0, 1), epochs=2)
    out = tmp_path / "reg"
    result = R.run_regularization(config, out=out, progress=False, print_fn=lambda *a: None)
    runs = load(out)["runs"]
    assert len(runs) == 2 * 2 * 2
    assert {(r["bn"], r["dropout"]) for r in runs} == {(a, b) for a in (0, 1) for b in (0, 1)}
    for r in runs:
        assert r["epoch"] == [1, 2] and len(r["test_loss"]) == 2
        assert r["gap"] == pytest.approx(r["train_accuracy"][-1] - r["test_accuracy"][-1])
        assert 0 <= r["final_test_accuracy"] <= 1
    for row in result["summary"]:
        gaps = [r["gap"] for r in runs if (r["bn"], r["dropout"]) == (row["bn"], row["dropout"])]
        assert row["gap"] == pytest.approx(np.mean(gaps))
        assert row["gap_std"] == pytest.approx(np.std(gaps, ddof=1))
    assert (out / "regularization.png").read_bytes().startswith(PNG)


def test_dropout_goes_after_hidden_activations_or_before_the_head():
    mlp = R.with_dropout(models.paper_mlp(activation="relu"), "mlp", 0.5, 0)
    names = [type(m).__name__ for m in mlp]
    assert names.count("Dropout") == 3 and names[-2:] == ["Dropout", "Linear"]
    assert names[names.index("ReLU") + 1] == "Dropout"
    cnn = R.with_dropout(models.seed_cnn(), "cnn", 0.5, 0)
    names = [type(m).__name__ for m in cnn]
    assert names[-3:] == ["Flatten", "Dropout", "Linear"]


def test_landscape_on_a_quadratic_has_the_closed_form():
    """L(p) = 1/2 p^T A p: along g = A p, L(p - eta g) and grad(p - eta g) - g = -eta A g are
    known exactly."""
    A = np.diag([1.0, 4.0, 9.0])
    p = np.array([1.0, -2.0, 0.5])

    def f(q):
        return 0.5 * q @ A @ q, A @ q

    g = A @ p
    etas = (0.01, 0.05, 0.1)
    got = R.landscape(f, p, etas)
    losses = [0.5 * p @ A @ p] + [0.5 * (p - e * g) @ A @ (p - e * g) for e in etas]
    assert got["losses"] == pytest.approx(losses)
    assert got["loss_range"] == pytest.approx(max(losses) - min(losses))
    assert got["grad_changes"] == pytest.approx([e * np.linalg.norm(A @ g) for e in etas])
    assert got["grad_change"] == pytest.approx(0.1 * np.linalg.norm(A @ g))
    assert got["relative_grad_change"] == pytest.approx(got["grad_change"] / np.linalg.norm(g))


def test_drift_by_hand():
    series = [[0.0, 1.0], [1.0, 1.0], [1.0, 3.0]]
    assert R.drift(series).tolist() == [0.5, 1.0]


def test_ics_tiny_run_structure(tmp_path):
    pytest.importorskip("torch")
    config = R.IcsConfig(dataset="digits", steps=20, probe_every=10, probe_size=50)
    R.run_ics(config, out=tmp_path / "ics", progress=False, print_fn=lambda *a: None)
    runs = load(tmp_path / "ics")["runs"]
    assert [r["config"] for r in runs] == ["standard", "bn", "noisy bn"]
    for r in runs:
        assert r["step"] == [1, 10, 20]
        assert len(r["loss_range"]) == len(r["grad_change"]) == len(r["test_accuracy"]) == 3
        assert set(r["drift"]) == {"layer 2 input", "layer 3 input"}
        assert set(r["drift"]["layer 2 input"]) == {"mean", "var", "p15", "p50", "p85"}
        assert all(len(v) == 3 for v in r["unit_percentiles"].values())
        p15, p50, p85 = (r["unit_percentiles"][k] for k in ("p15", "p50", "p85"))
        assert all(a <= b <= c for a, b, c in zip(p15, p50, p85))
    assert (tmp_path / "ics" / "ics.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("args,message", [
    (["reproduce", "ics", "--steps", "0"], "positive integer"),
    (["reproduce", "regularization", "--models", "vgg"], "invalid choice"),
    (["reproduce", "regularization", "--seeds", "x"], "invalid int value"),
    (["reproduce", "nope"], "invalid choice")])
def test_new_experiments_bad_values(args, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(args)
    assert message in capsys.readouterr().err
