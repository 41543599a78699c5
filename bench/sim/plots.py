"""PNG plots of the simulator's results (bench/results/sim_*.json -> docs/img/sim_*.png)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.config import POLICIES  # noqa: E402

STYLE = {"skip-join-mlfq": "o-", "mlfq": "s--", "fcfs": "^-", "rtc": "x:", "srpt-oracle": "d-."}


def plot_paper(data: dict, out: Path) -> None:
    cvs = sorted({p["cv"] for p in data["points"]})
    fig, axes = plt.subplots(3, len(cvs), figsize=(4.2 * len(cvs), 10), squeeze=False)
    for col, cv in enumerate(cvs):
        points = sorted((p for p in data["points"] if p["cv"] == cv), key=lambda p: p["rate"])
        rates = [p["rate"] for p in points]
        for row, stat in enumerate(("mean", "p50", "p99")):
            ax = axes[row][col]
            for name in POLICIES:
                ax.plot(rates, [p["policies"][name]["jct_s"][stat] for p in points], STYLE[name], label=name)
            ax.set_yscale("log")
            ax.set_title(f"CV {cv:g}: {stat} JCT")
            ax.set_xlabel("arrival rate (requests/s)")
            ax.set_ylabel("JCT (s)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("GPT-3 175B on 16 x A100-40GB (TP 8 x PP 2), Zipf lengths, simulated")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_traces(data: dict, out: Path) -> None:
    points = data["points"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(POLICIES)
    labels = [f"{p['trace']}\n{p['rate']:g} req/s" for p in points]
    for ax, stat in zip(axes, ("mean", "p99")):
        for k, name in enumerate(POLICIES):
            xs = [i + (k - len(POLICIES) / 2 + 0.5) * width for i in range(len(points))]
            ax.bar(xs, [p["policies"][name]["jct_s"][stat] for p in points], width, label=name)
        ax.set_xticks(range(len(points)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{stat} JCT (s)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Real traces on Llama-3-8B, one H100-80GB, context 8192, simulated")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_all(results: Path, img: Path) -> None:
    img.mkdir(parents=True, exist_ok=True)
    for name, fn in (("paper", plot_paper), ("traces", plot_traces)):
        path = results / f"sim_{name}.json"
        if path.is_file():
            fn(json.loads(path.read_text()), img / f"sim_{name}.png")
            print(f"wrote {img / f'sim_{name}.png'}")
