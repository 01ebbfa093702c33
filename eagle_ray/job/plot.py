"""The job's picture of a run: the loss and the acceptance curves, with measured acceptance where it was measured."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("eagle_ray.job")


def plot_history(history: list[dict[str, Any]], path: Path, measured: dict[str, Any] | None = None) -> Path | None:
    """Write `path` (PNG): loss, accuracy per TTT step and simulated acceptance per step; `measured` at its step.

    `measured`: an evaluation's summary (`speculative_greedy(...).summary()`) plus the `step` it ran at.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plot")
        return None
    steps = [r["step"] for r in history]
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(15, 4))
    a.plot(steps, [r["loss"] for r in history])
    a.set(xlabel="step", ylabel="TTT loss (0.8^k-weighted mean, nats)", title="loss")
    for k in range(len(history[0]["acc"])):
        c.plot(steps, [r["acc"][k] for r in history], label=f"TTT step {k}")
    c.set(xlabel="step", ylabel="top-1 accuracy", title="accuracy per TTT step", ylim=(0, 1))
    c.legend(fontsize="small")
    b.plot(steps, [r["acceptance_chain"] for r in history], label="simulated (chain)")
    b.plot(steps, [r["acceptance_product"] for r in history], label="simulated (product)")
    if measured is not None:
        b.scatter(
            [measured["step"]], [measured["acceptance_length"]], color="black", zorder=3, label="measured (decoding)"
        )
    b.set(xlabel="step", ylabel="tokens per verify", title="acceptance")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
