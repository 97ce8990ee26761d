"""Mini-batch SGD with (Nesterov) momentum, and learning-rate schedules.

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


def make_schedule(config=None, **kwargs) -> Schedule:
    """A schedule from a FitConfig (fields schedule, lr, step_epochs, gamma, eta_min, eta_max,
    n_s, cycles) and/or keyword overrides of the same names (`kind` = `schedule`)."""
    values = {"schedule": "constant", "lr": 0.01, "step_epochs": 10, "gamma": 0.1,
              "eta_min": 0.0, "eta_max": 0.1, "n_s": 500, "cycles": None}
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
    raise ConfigError(f"schedule: got {kind!r}, expected one of constant, step, cosine, cyclic")
