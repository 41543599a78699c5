"""PNG plots of the simulator's results (bench/results/sim_*.json -> docs/img/sim_*.png)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.config import POLICIES  # noqa: E402

STYLE = {"skip-join-mlfq": "o-", "mlfq": "s--", "fcfs": "^-", "orca": "v-", "rtc": "x:", "srpt-oracle": "d-."}
COLOR = {name: f"C{k}" for k, name in enumerate(STYLE)}  # one colour per policy in every panel


def plot_paper(data: dict, out: Path) -> None:
    cvs = sorted({p["cv"] for p in data["points"]})
    fig, axes = plt.subplots(3, len(cvs), figsize=(4.2 * len(cvs), 10), squeeze=False)
    for col, cv in enumerate(cvs):
        points = sorted((p for p in data["points"] if p["cv"] == cv and p.get("zipf", 1.1) == 1.1), key=lambda p: p["rate"])
        rates = [p["rate"] for p in points]
        for row, stat in enumerate(("mean", "p50", "p99")):
            ax = axes[row][col]
            for name in POLICIES:
                ax.plot(rates, [p["policies"][name]["jct_s"][stat] for p in points], STYLE[name], color=COLOR[name],
                        label=name)
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


def plot_skew(data: dict, out: Path) -> None:
    """JCT against the Zipf exponent of the lengths, and each policy's gain over orca and fcfs."""
    by_skew = {}
    for p in data["points"]:
        if (p["rate"], p["cv"]) == (4.0, 2.0):
            by_skew[p.get("zipf", 1.1)] = p
    if len(by_skew) < 2:
        return
    skews = sorted(by_skew)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for name in POLICIES:
        axes[0].plot(skews, [by_skew[z]["policies"][name]["jct_s"]["mean"] for z in skews], STYLE[name],
                     color=COLOR[name], label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean JCT (s)")
    for ax, base in zip(axes[1:], ("orca", "fcfs")):
        for name in POLICIES:
            if name != base:
                ax.plot(skews, [by_skew[z]["policies"][base]["jct_s"]["mean"] / by_skew[z]["policies"][name]["jct_s"]["mean"]
                                for z in skews], STYLE[name], color=COLOR[name], label=name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel(f"{base} mean JCT / policy's")
    for ax in axes:
        ax.set_xlabel("Zipf exponent of input and output lengths")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("GPT-3 175B on 16 x A100-40GB, 4 req/s, CV 2, simulated: skew")
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
            if name == "paper":
                plot_skew(json.loads(path.read_text()), img / "sim_paper_skew.png")
                print(f"wrote {img / 'sim_paper_skew.png'}")
