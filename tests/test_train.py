"""fit / evaluate / checkpoints."""

import numpy as np
import pytest

from bnlab import data, models, nn, train


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def small_cnn(bn=True, seed=0):
    return models.seed_cnn(bn=bn, image_size=8, channels=(4, 8), seed=seed)


def test_fit_records_history_and_learns(digits):
    hist = train.fit(small_cnn(), digits, steps=60, lr=0.1, batch_size=32, eval_every=20,
                     progress=False)
    assert hist.step == list(range(1, 61)) and len(hist.loss) == 60
    assert hist.eval_step == [20, 40, 60]
    assert hist.test_accuracy[-1] > 0.8  # 10 classes: chance is 0.1
    assert not hist.diverged and hist.seconds > 0


def test_fit_is_deterministic_under_a_seed(digits):
    runs = [train.fit(small_cnn(), digits, steps=15, lr=0.1, batch_size=16, seed=3,
                      eval_every=5, progress=False) for _ in range(2)]
    assert runs[0].loss == runs[1].loss
    assert runs[0].test_accuracy == runs[1].test_accuracy
    other = train.fit(small_cnn(), digits, steps=15, lr=0.1, batch_size=16, seed=4,
                      eval_every=5, progress=False)
    assert other.loss != runs[0].loss


def test_divergence_is_detected_and_stops_training(digits):
    model = models.paper_mlp(bn=False, activation="relu", in_features=64, weight_std=5.0)
    hist = train.fit(model, digits, steps=200, lr=50.0, batch_size=32, progress=False)
    assert hist.diverged and len(hist.step) < 200
    assert np.isnan(hist.loss[-1]) and hist.eval_step[-1] == hist.step[-1]


def test_evaluate_restores_the_mode(digits):
    model = small_cnn()
    model.train()
    result = train.evaluate(model, digits)
    assert set(result) == {"accuracy", "loss"} and model.training
    model.eval()
    train.evaluate(model, digits)
    assert not model.training


def test_checkpoint_round_trip(tmp_path, digits):
    model = small_cnn()
    train.fit(model, digits, steps=5, batch_size=16, progress=False)
    opt = nn.SGD(model.parameters(), 0.1, momentum=0.9)
    for p in model.parameters():
        p.grad += 1.0
    opt.step()
    path = train.save_checkpoint(tmp_path / "ck.npz", model, opt, step=5, note="x")
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]  # no temporary left behind
    fresh, fresh_opt = small_cnn(seed=9), None
    fresh_opt = nn.SGD(fresh.parameters(), 0.1, momentum=0.9)
    meta = train.load_checkpoint(path, fresh, fresh_opt)
    assert meta == {"note": "x", "step": 5}
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    np.testing.assert_array_equal(fresh_opt.velocity[0], opt.velocity[0])


def test_damaged_or_mismatched_checkpoints_are_clear_errors(tmp_path):
    model = small_cnn()
    path = train.save_checkpoint(tmp_path / "ck.npz", model)
    raw = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(train.CheckpointError, match="cut.npz is damaged"):
        train.load_checkpoint(tmp_path / "cut.npz", small_cnn())
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    with pytest.raises(train.CheckpointError, match="damaged"):
        train.load_checkpoint(tmp_path / "flip.npz", small_cnn())
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(train.CheckpointError, match="not a bnlab checkpoint"):
        train.load_checkpoint(tmp_path / "other.npz", small_cnn())
    with pytest.raises(train.CheckpointError, match="does not fit this model: .*missing keys"):
        train.load_checkpoint(path, small_cnn(bn=False))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.load_checkpoint(tmp_path / "nope.npz", model)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        train.atomic_write(target, failing)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_fit_argument_errors(digits):
    with pytest.raises(ValueError, match="larger than the training split"):
        train.fit(small_cnn(), digits, batch_size=100000, progress=False)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train.fit(small_cnn(), digits, steps=1, optimizer="rmsprop", progress=False)
