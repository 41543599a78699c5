"""PNG plots of load-test results: JCT CDF per policy, latency against request rate (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_jct_cdf(jcts: dict[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """One CDF line per policy; `jcts` maps a policy to its requests' JCTs in seconds."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, values in jcts.items():
        xs = np.sort(np.asarray(values, dtype=float))
        if len(xs):
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=policy)
    ax.set_xscale("log")
    ax.set_xlabel("job completion time (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "JCT CDF")
    return _save(fig, path)


def plot_latency_vs_rate(sweep: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Mean and p99 JCT against offered rate, one line per policy; `sweep` items are
    {"rate": r, "policy": p, "summary": {...}} as written in the results JSON."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    policies = list(dict.fromkeys(item["policy"] for item in sweep))
    for ax, stat in zip(axes, ("mean", "p99")):
        for policy in policies:
            points = sorted((item["rate"], item["summary"]["jct_s"][stat]) for item in sweep
                            if item["policy"] == policy and "jct_s" in item["summary"])
            if points:
                ax.plot(*zip(*points), marker="o", label=policy)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{stat} JCT (s)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "latency against request rate")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
