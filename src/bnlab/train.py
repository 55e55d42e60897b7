"""Training loop, evaluation and checkpoints.

``fit`` runs mini-batch training with a progress bar and records, per step, the loss and
accuracy of the training batch, and at set intervals the test loss and accuracy. Runs are
deterministic: the same model weights, data, arguments and ``seed`` give the same history.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from . import kernels, nn
from .data import BatchStream, Dataset, iterate_batches
from .extras import need

OPTIMIZERS = ("sgd", "adam")


@dataclass
class History:
    """What ``fit`` measured. ``step`` counts optimizer updates from 1."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # training batch loss
    accuracy: list[float] = field(default_factory=list)  # training batch accuracy
    eval_step: list[int] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    diverged: bool = False  # loss became NaN/inf; stopped

    def to_dict(self) -> dict:
        return asdict(self)

    def record_eval(self, step: int, ev: dict) -> None:
        """Append one evaluation (``{"loss", "accuracy"}`` on the test split) at ``step``."""
        self.eval_step.append(step)
        self.test_loss.append(ev["loss"])
        self.test_accuracy.append(ev["accuracy"])

    def steps_to_reach(self, accuracy: float) -> int | None:
        """First evaluated step whose test accuracy is >= ``accuracy`` (None if never)."""
        for s, a in zip(self.eval_step, self.test_accuracy):
            if a >= accuracy:
                return s
        return None


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    if name == "sgd":
        return nn.SGD(params, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return nn.Adam(params, lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def evaluate(
    model: nn.Module, data: Dataset, *, split: str = "test", batch_size: int = 1000
) -> dict:
    """Loss and accuracy of ``model`` in evaluation mode on a split ("test" or "train").

    BN layers use their running statistics; the model's train/eval mode is restored after.
    """
    if split not in ("test", "train"):
        raise ValueError(f'split must be "test" or "train", got {split!r}')
    images, labels = getattr(data, split)
    was_training = model.training
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct = 0.0, 0
    try:
        # BN kernels on one thread: here they sit between multi-threaded GEMMs (kernels/)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"), kernels.num_threads(1):
            for xb, yb in iterate_batches(images, labels, batch_size, shuffle=False):
                logits = model(xb)
                total_loss += loss_fn(logits, yb) * len(yb)
                correct += int((logits.argmax(axis=1) == yb).sum())
    finally:
        model.train(was_training)
    n = len(labels)
    return {"accuracy": correct / n, "loss": total_loss / n}


def fit(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int = 1,
    steps: int | None = None,
    lr: float = 0.01,
    batch_size: int = 64,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    eval_every: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int | None = None,
    resume: dict | None = None,
) -> History:
    """Train ``model`` on ``data.train`` with cross-entropy; return a :class:`History`.

    Args:
        epochs: passes over the training split (ignored when ``steps`` is given).
        steps: total optimizer updates; batches are drawn epoch after epoch as needed.
        lr, batch_size, optimizer, momentum, weight_decay: the optimizer ("sgd" or "adam";
            momentum for SGD) and the mini-batch size.
        seed: shuffling and dropout masks. Batches are full (``drop_last``), so BN never
            sees a batch of one.
        eval_every: evaluate on the test split every this many steps (and at the end);
            default once per epoch.
        progress: show a tqdm progress bar; desc labels it.
        callback: called as ``callback(step, model)`` after every update (for probes).
        checkpoint: called as ``checkpoint(state)`` every ``checkpoint_every`` steps (default:
            about once a minute of training) with what a resumed run needs besides the
            model and the optimizer (:func:`save_checkpoint` writes those): the step, the
            history, where the batch stream is, the dropout generators.
        resume: such a state (with the model and optimizer already loaded): training goes
            on from its step and ends exactly as the uninterrupted run would.

    A NaN or inf loss (or NaN batch statistics) stops training with ``diverged=True``.
    """
    n_train = len(data.train[1])
    if batch_size > n_train:
        raise ValueError(f"batch_size {batch_size} is larger than the training split ({n_train})")
    per_epoch = n_train // batch_size
    total = int(steps) if steps is not None else int(epochs) * per_epoch
    if total < 1:
        raise ValueError("nothing to train: epochs and steps must be positive")
    eval_every = int(eval_every or per_epoch)
    rng = np.random.default_rng(seed)
    dropouts = [mod for _, mod in model.named_modules() if isinstance(mod, nn.Dropout)]
    for mod in dropouts:
        mod.rng = np.random.default_rng(rng.integers(2**63))
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    hist = History()
    stream = BatchStream(*data.train, batch_size, rng)
    first = 1
    if resume is not None:
        first = int(resume["step"]) + 1
        hist = History(**resume["history"])
        stream.restore(resume["stream"])
        for mod, state in zip(dropouts, resume["dropout"]):
            mod.rng.bit_generator.state = state
        if "optimizer" in resume:
            opt.load_state_dict(resume["optimizer"])
    last_save = time.perf_counter()
    elapsed = hist.seconds  # training time before a resume

    def save(step: int, write=checkpoint) -> None:
        if write is None:
            return
        hist.seconds = elapsed + time.perf_counter() - start
        write(
            {
                "step": step,
                "history": hist.to_dict(),
                "stream": stream.state(),
                "dropout": [mod.rng.bit_generator.state for mod in dropouts],
                "optimizer": opt.state_dict(),
            }
        )

    tqdm = need("tqdm.auto", "the progress bar").tqdm

    bar = tqdm(
        total=total, initial=first - 1, desc=desc, disable=not progress, unit="step", leave=False
    )
    model.train()
    start = time.perf_counter()
    # BN kernels on one thread: here they sit between multi-threaded GEMMs (kernels/)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), kernels.num_threads(1):
        for step, (xb, yb) in zip(range(first, total + 1), stream):
            opt.zero_grad()
            try:
                logits = model(xb)
                loss = loss_fn(logits, yb)
            except FloatingPointError:  # NaN reached a BN layer's batch statistics
                loss = float("nan")
            if not np.isfinite(loss):
                hist.diverged = True
                hist.step.append(step)
                hist.loss.append(float("nan"))
                hist.accuracy.append(float("nan"))
                break
            model.backward(loss_fn.backward())
            opt.step()
            hist.step.append(step)
            hist.loss.append(loss)
            hist.accuracy.append(float((logits.argmax(axis=1) == yb).mean()))
            if callback is not None:
                callback(step, model)
            if step % eval_every == 0 or step == total:
                ev = evaluate(model, data)
                hist.record_eval(step, ev)
                bar.set_postfix(loss=f"{loss:.3f}", test_acc=f"{ev['accuracy']:.3f}")
            due = (
                (step % checkpoint_every == 0)
                if checkpoint_every
                else time.perf_counter() - last_save >= CHECKPOINT_SECONDS
            )
            if checkpoint is not None and due and step < total:
                save(step)
                last_save = time.perf_counter()
            bar.update(1)
    bar.close()
    if hist.diverged:  # record where it ended: a diverged net scores as it stands
        hist.record_eval(hist.step[-1], evaluate(model, data))
    hist.seconds = elapsed + time.perf_counter() - start
    return hist


# --- checkpoints ---------------------------------------------------------------------------

CHECKPOINT_FORMAT = "bnlab-checkpoint-1"
CHECKPOINT_SECONDS = 60.0  # the default interval of resumable checkpoints during training


class CheckpointError(RuntimeError):
    """A checkpoint file is damaged, not a bnlab checkpoint, or does not fit the model."""


def atomic_write(path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` via a temporary file in the same folder and ``os.replace``: readers see
    the old file or the complete new one, never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path, model: nn.Module, optimizer=None, **meta) -> Path:
    """Save the model's state dict (PyTorch keys), the optimizer state and JSON metadata
    into one ``.npz`` file, atomically."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optim/{k}": np.asarray(v) for k, v in optimizer.state_dict().items()})
    arrays["format"] = np.array(CHECKPOINT_FORMAT)
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    return atomic_write(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """The model state dict, optimizer state and metadata of a checkpoint written by
    :func:`save_checkpoint` (NumPy arrays, read without pickle). Raises CheckpointError,
    naming the file, when it is damaged or not a bnlab checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a bnlab checkpoint ({e})"
        ) from e
    if str(arrays.get("format", "")) != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a bnlab checkpoint (format "
            f"{arrays.get('format')!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    try:
        meta = json.loads(str(arrays["meta"]))
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its metadata is missing or not JSON ({e})"
        ) from e

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}

    return part("model/"), part("optim/"), meta


def load_checkpoint(path, model: nn.Module, optimizer=None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and
    ``optimizer``); return its metadata. Raises CheckpointError, naming the file, when it
    is damaged, not a bnlab checkpoint, or its keys or shapes do not fit the model."""
    state, optim_state, meta = read_checkpoint(path)
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from e
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    return meta
