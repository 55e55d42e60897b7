"""Optimizers with PyTorch's update rules (weight decay is L2 added to the gradient)."""

from __future__ import annotations

import numpy as np

from .module import Parameter


class Optimizer:
    def __init__(self, params, lr: float):
        self.params: list[Parameter] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr!r}")
        self.lr = float(lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad[...] = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

        g = grad + weight_decay * w
        v = momentum * v + g          (v = g on the first step)
        w = w - lr * v

    Args: params, lr, momentum=0.0, weight_decay=0.0.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight_decay must be non-negative")
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.velocity: list[np.ndarray | None] = [None] * len(self.params)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            if self.momentum:
                v = self.velocity[i]
                if v is None:
                    v = self.velocity[i] = g.copy()
                else:
                    v *= self.momentum
                    v += g
                g = v
            p.data -= self.lr * g

    def state_dict(self):
        return {f"velocity.{i}": v for i, v in enumerate(self.velocity) if v is not None}

    def load_state_dict(self, state):
        self.velocity = [state.get(f"velocity.{i}") for i in range(len(self.params))]


class Adam(Optimizer):
    """Adam (Kingma & Ba), as ``torch.optim.Adam``.

        g = grad + weight_decay * w
        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
        w = w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Args: params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, lr)
        self.beta1, self.beta2 = map(float, betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.t = 0
        self.m = [np.zeros_like(p.data) for p in self.params]
        self.v = [np.zeros_like(p.data) for p in self.params]

    def step(self) -> None:
        self.t += 1
        c1, c2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            p.data -= self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)

    def state_dict(self):
        out = {"t": np.array(self.t)}
        out.update({f"m.{i}": m for i, m in enumerate(self.m)})
        out.update({f"v.{i}": v for i, v in enumerate(self.v)})
        return out

    def load_state_dict(self, state):
        self.t = int(state["t"])
        self.m = [np.array(state[f"m.{i}"]) for i in range(len(self.params))]
        self.v = [np.array(state[f"v.{i}"]) for i in range(len(self.params))]
