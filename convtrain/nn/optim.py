"""Mini-batch SGD with (Nesterov) momentum, AdamW, gradient clipping, and learning-rate schedules.

SGD follows PyTorch's formulation, so its updates can be checked against torch.optim.SGD:

    v <- momentum * v + g                 (v starts at 0)
    p <- p - lr * v                       (classical momentum)
    p <- p - lr * (g + momentum * v)      (Nesterov)

L2 regularization is part of the cost (the network adds 2 * l2 * W to the weight
gradients), so the optimizer itself has no weight decay.

Schedules give the learning rate of the update about to be made: `lr(step, epoch)` with
`step` the number of updates already done (0 for the first) and `epoch` 1-based.

A cosine schedule depends on the fit's length. The Trainer plans it with `plan(total, step)`
before training; a fit resumed with another length (`--resume ... --epochs 30`) re-plans it at
the step it resumes from. The rule: the updates already made keep the horizon they were planned
with, and from the resume step the cosine starts again from the learning rate reached there
and falls to eta_min over the new remaining updates. So the rate never jumps back up; a fit
that had already reached eta_min stays there. The plan (every segment) is part of the
checkpoint (`to_dict` / `load_plan`), so a killed and resumed fit follows the same rates bit
for bit. Step, constant and cyclic schedules do not depend on the length: nothing to re-plan.
"""

from __future__ import annotations

import math

import numpy as np

from convtrain.config import DEFAULTS, SCHEDULES
from convtrain.errors import CheckpointError, ConfigError


class SGD:
    def __init__(self, params: dict[str, np.ndarray], lr: float, momentum: float = 0.0, nesterov: bool = False):
        if not 0 <= momentum < 1:
            raise ConfigError(f"momentum: got {momentum!r}, expected a value in [0, 1)")
        if nesterov and momentum == 0:
            raise ConfigError("nesterov: Nesterov momentum needs momentum > 0")
        self.params = params
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.velocities = {name: np.zeros_like(p) for name, p in params.items()} if momentum else {}

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """Update every parameter in place from its gradient."""
        lr = self.lr if lr is None else float(lr)
        mu = self.momentum
        for name, param in self.params.items():
            grad = grads[name]
            if not mu:
                param -= lr * grad
                continue
            velocity = self.velocities[name]
            velocity *= mu
            velocity += grad
            if self.nesterov:
                param -= lr * (grad + mu * velocity)
            else:
                param -= lr * velocity

    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: v.copy() for name, v in self.velocities.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if set(state) != set(self.velocities):
            raise CheckpointError(
                f"optimizer state has velocities for {sorted(state)}, expected {sorted(self.velocities)}")
        for name, velocity in self.velocities.items():
            value = np.asarray(state[name])
            if value.shape != velocity.shape:
                raise CheckpointError(f"optimizer state: velocity {name} has shape {value.shape}, expected {velocity.shape}")
            np.copyto(velocity, value, casting="same_kind")


class AdamW:
    """Adam with decoupled weight decay, as torch.optim.AdamW (same defaults, same order):

        p <- p * (1 - lr * weight_decay)               (only the parameters in `decay`)
        m <- beta1 * m + (1 - beta1) * g,   v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    `decay` names the parameters that decay (default: all, as PyTorch with one param group;
    the Trainer passes the conv and dense weights, not biases nor batch norm's gamma/beta).
    """

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, decay=None):
        beta1, beta2 = (float(b) for b in betas)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ConfigError(f"beta1, beta2: got {beta1!r}, {beta2!r}, expected values in [0, 1)")
        if not eps > 0:
            raise ConfigError(f"eps: got {eps!r}, expected a value > 0")
        if not weight_decay >= 0:
            raise ConfigError(f"weight_decay: got {weight_decay!r}, expected a value >= 0")
        self.params = params
        self.lr = float(lr)
        self.beta1, self.beta2, self.eps = beta1, beta2, float(eps)
        self.weight_decay = float(weight_decay)
        self.decay = set(params) if decay is None else set(decay)
        self.steps = 0
        self.exp_avg = {name: np.zeros_like(p) for name, p in params.items()}
        self.exp_avg_sq = {name: np.zeros_like(p) for name, p in params.items()}

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        lr = self.lr if lr is None else float(lr)
        self.steps += 1
        b1, b2 = self.beta1, self.beta2
        step_size = lr / (1 - b1 ** self.steps)
        correction2_sqrt = math.sqrt(1 - b2 ** self.steps)
        for name, param in self.params.items():
            grad = grads[name]
            if self.weight_decay and name in self.decay:
                param *= 1 - lr * self.weight_decay
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m *= b1
            m += (1 - b1) * grad
            v *= b2
            v += (1 - b2) * grad * grad
            denom = np.sqrt(v)
            denom /= correction2_sqrt
            denom += self.eps
            param -= step_size * (m / denom)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The moments as arrays ("exp_avg/<name>", "exp_avg_sq/<name>") and the step count."""
        state = {"steps": np.array(self.steps, dtype=np.int64)}
        for name in self.params:
            state[f"exp_avg/{name}"] = self.exp_avg[name].copy()
            state[f"exp_avg_sq/{name}"] = self.exp_avg_sq[name].copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        expected = {"steps"} | {f"{kind}/{name}" for kind in ("exp_avg", "exp_avg_sq") for name in self.params}
        if set(state) != expected:
            raise CheckpointError(
                f"AdamW state: got entries {sorted(state)[:6]}..., expected {sorted(expected)[:6]}...")
        for kind, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            for name, target in moments.items():
                value = np.asarray(state[f"{kind}/{name}"])
                if value.shape != target.shape:
                    raise CheckpointError(f"AdamW state: {kind} {name} has shape {value.shape}, expected {target.shape}")
                np.copyto(target, value, casting="same_kind")
        self.steps = int(state["steps"])


def clip_grad_norm_(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place by max_norm / (total + 1e-6) when their global L2 norm
    `total` exceeds max_norm, as torch.nn.utils.clip_grad_norm_; returns total (before)."""
    total = 0.0
    for grad in grads.values():
        flat = grad.reshape(-1).astype(np.float64, copy=False)
        total += float(np.einsum("i,i->", flat, flat))  # einsum: no BLAS threads, fixed order
    total = math.sqrt(total)
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for grad in grads.values():
            grad *= grad.dtype.type(coef)
    return total


def make_optimizer(network, config):
    """SGD or AdamW as a FitConfig asks (fields optimizer, lr, momentum, nesterov, beta1,
    beta2, eps, weight_decay); AdamW's weight decay applies to conv and dense weights only."""
    kind = getattr(config, "optimizer", "sgd")
    if kind == "sgd":
        return SGD(network.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    if kind == "adamw":
        return AdamW(network.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                     eps=config.eps, weight_decay=config.weight_decay, decay=network.weight_names())
    raise ConfigError(f"optimizer: got {kind!r}, expected sgd or adamw")


# ---- schedules ----------------------------------------------------------------------


class Schedule:
    """Base: the learning rate as a function of (updates done, 1-based epoch)."""

    kind = "constant"

    def __init__(self, lr: float):
        self.base_lr = float(lr)
        # Set by the trainer once the data size is known (cosine needs it).
        self.total_steps: int | None = None

    def lr(self, step: int, epoch: int) -> float:
        return self.base_lr

    def planned_steps(self) -> int | None:
        """A fixed number of updates this schedule asks for (cyclic with `cycles`), else None."""
        return None

    def plan(self, total_steps: int, step: int = 0) -> None:
        """Set the fit's length (`total_steps` updates) before training from `step` updates done."""
        self.total_steps = int(total_steps)

    def load_plan(self, saved: dict) -> None:
        """Restore the plan a checkpoint recorded (to_dict()); the base schedules have none."""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lr": self.base_lr}


class ConstantSchedule(Schedule):
    kind = "constant"


class StepSchedule(Schedule):
    """lr * gamma ** floor((epoch - 1) / step_epochs): decays by gamma every step_epochs epochs."""

    kind = "step"

    def __init__(self, lr: float, step_epochs: int = 10, gamma: float = 0.1):
        super().__init__(lr)
        self.step_epochs = int(step_epochs)
        self.gamma = float(gamma)

    def lr(self, step, epoch):
        return self.base_lr * self.gamma ** ((epoch - 1) // self.step_epochs)

    def to_dict(self):
        return {**super().to_dict(), "step_epochs": self.step_epochs, "gamma": self.gamma}


class CosineSchedule(Schedule):
    """eta_min + (lr - eta_min) * (1 + cos(pi * step / total_steps)) / 2 over all updates of the fit.

    Planned as segments (start step, end step, lr at the start): one for a fit that keeps its
    length; each resume with another length adds one from the resume step, starting at the rate
    reached there (see the module docstring).
    """

    kind = "cosine"

    def __init__(self, lr: float, eta_min: float = 0.0):
        super().__init__(lr)
        self.eta_min = float(eta_min)
        self.segments: list[tuple[int, int, float]] = []

    def plan(self, total_steps, step=0):
        total_steps, step = int(total_steps), int(step)
        if not self.segments or step == 0:
            self.segments = [(0, total_steps, self.base_lr)]
        elif self.segments[-1][1] != total_steps:
            start_lr = self.lr(step, 0)
            # re-planned again at the same step (resumed, stopped before an update, resumed
            # with yet another length): that segment is replaced, not stacked
            kept = [segment for segment in self.segments if segment[0] < step]
            self.segments = kept + [(step, total_steps, start_lr)]
        self.total_steps = total_steps

    def lr(self, step, epoch):
        segments = self.segments
        if not segments:  # total_steps set by hand, without plan()
            if not self.total_steps:
                raise ConfigError("schedule 'cosine' needs the total number of updates (set by the Trainer)")
            segments = [(0, self.total_steps, self.base_lr)]
        start, end, start_lr = next((seg for seg in reversed(segments) if seg[0] <= step), segments[0])
        progress = min((step - start) / (end - start), 1.0) if end > start else 1.0
        return self.eta_min + (start_lr - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self):
        return {**super().to_dict(), "eta_min": self.eta_min, "segments": [list(seg) for seg in self.segments]}

    def load_plan(self, saved):
        segments = saved.get("segments") if isinstance(saved, dict) else None
        if not segments:  # a checkpoint from before plans were saved: planned afresh by plan()
            return
        try:
            self.segments = [(int(start), int(end), float(start_lr)) for start, end, start_lr in segments]
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"schedule: unusable cosine plan {segments!r} ({exc})") from None
        self.total_steps = self.segments[-1][1]


class CyclicSchedule(Schedule):
    """DD2424's triangular cyclical learning rate: from eta_min up to eta_max in n_s updates
    and back down in n_s more; one cycle is 2 * n_s updates. With `cycles` the fit runs
    exactly 2 * n_s * cycles updates (this, not `epochs`, then sets the length)."""

    kind = "cyclic"

    def __init__(self, eta_min: float, eta_max: float, n_s: int, cycles: int | None = None):
        super().__init__(eta_min)
        self.eta_min = float(eta_min)
        self.eta_max = float(eta_max)
        self.n_s = int(n_s)
        self.cycles = None if cycles is None else int(cycles)

    def lr(self, step, epoch):
        position = step % (2 * self.n_s)
        if position <= self.n_s:
            fraction = position / self.n_s
        else:
            fraction = 2.0 - position / self.n_s
        return self.eta_min + fraction * (self.eta_max - self.eta_min)

    def planned_steps(self):
        return None if self.cycles is None else 2 * self.n_s * self.cycles

    def to_dict(self):
        return {"kind": self.kind, "eta_min": self.eta_min, "eta_max": self.eta_max,
                "n_s": self.n_s, "cycles": self.cycles}


def training_length(schedule: Schedule, epochs: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, updates) a fit trains: the schedule's planned updates when it has them (cyclic
    with `cycles`; the last epoch may stop part-way), else `epochs` full epochs. The Trainer
    runs this length and `convtrain fit` reports it, from this one function."""
    planned = schedule.planned_steps()
    if planned is not None:
        return math.ceil(planned / steps_per_epoch), planned
    return epochs, epochs * steps_per_epoch


# the FitConfig fields a schedule is made of
SCHEDULE_FIELDS = ("schedule", "lr", "step_epochs", "gamma", "eta_min", "eta_max", "n_s", "cycles")


def make_schedule(config=None, **kwargs) -> Schedule:
    """A schedule from a FitConfig (fields schedule, lr, step_epochs, gamma, eta_min, eta_max,
    n_s, cycles) and/or keyword overrides of the same names (`kind` = `schedule`); a value given
    by neither is FitConfig's default, so `make_schedule()` and `convtrain fit` agree."""
    values = {name: DEFAULTS[name] for name in SCHEDULE_FIELDS}  # FitConfig owns the defaults
    if config is not None:
        values.update({k: getattr(config, k) for k in values})
    if "kind" in kwargs:
        kwargs["schedule"] = kwargs.pop("kind")
    unknown = set(kwargs) - set(values)
    if unknown:
        raise ConfigError(f"make_schedule: unknown arguments {sorted(unknown)}, expected {sorted(values)}")
    values.update(kwargs)
    kind = values["schedule"]
    if kind == "constant":
        return ConstantSchedule(values["lr"])
    if kind == "step":
        return StepSchedule(values["lr"], values["step_epochs"], values["gamma"])
    if kind == "cosine":
        return CosineSchedule(values["lr"], values["eta_min"])
    if kind == "cyclic":
        return CyclicSchedule(values["eta_min"], values["eta_max"], values["n_s"], values["cycles"])
    raise ConfigError(f"schedule: got {kind!r}, expected one of {', '.join(SCHEDULES)}")
