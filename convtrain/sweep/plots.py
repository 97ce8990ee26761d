"""Sweep plots for the parent run: objective vs each swept parameter, optimization history."""

from __future__ import annotations

from pathlib import Path

from convtrain.sweep.report import TrialRow
from convtrain.sweep.spec import Choices, SweepSpec


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, also without a display
    import matplotlib.pyplot as plt

    return plt


def objective_vs_parameters(rows: list[TrialRow], spec: SweepSpec, path: Path) -> Path | None:
    """One panel per swept parameter: each completed trial's objective against its value."""
    done = [r for r in rows if r.value is not None]
    if not done:
        return None
    plt = _pyplot()
    names = list(spec.space)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        p = spec.space[name]
        values = [r.value for r in done]
        if isinstance(p, Choices):
            labels = [str(label) for label in p.labels]
            xs = [labels.index(str(r.params[name])) for r in done]
            ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            xs = [r.params[name] for r in done]
            if p.log:
                ax.set_xscale("log")
        ax.scatter(xs, values, alpha=0.75)
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(spec.objective)
    fig.suptitle(f"{spec.name}: {spec.objective} by parameter")
    return _save(plt, fig, path)


def optimization_history(rows: list[TrialRow], spec: SweepSpec, path: Path) -> Path | None:
    """Each completed trial's objective by trial number, with the best so far as a step line."""
    done = sorted((r for r in rows if r.value is not None), key=lambda r: r.number)
    if not done:
        return None
    plt = _pyplot()
    better = max if spec.direction == "maximize" else min
    best_so_far, best = [], None
    for r in done:
        best = r.value if best is None else better(best, r.value)
        best_so_far.append(best)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    numbers = [r.number for r in done]
    ax.scatter(numbers, [r.value for r in done], label="trial", alpha=0.75)
    ax.step(numbers, best_so_far, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(spec.objective)
    ax.set_title(f"{spec.name}: optimization history ({spec.method})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
