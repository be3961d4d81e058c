"""PNG plots of evaluation results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def pareto_plot(result: dict, path: str | Path, title: str = "quality vs cost") -> Path:
    """Perplexity and cloze accuracy against FLOPs/token for each width of an eval result."""
    widths = result["widths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in widths.items():
        mix = not isinstance(r["ffn"], int)  # per-layer: a Mix'n'Match profile
        style = {"marker": "s" if mix else "o", "color": "tab:gray" if mix else "tab:blue"}
        axes[0].scatter(r["flops_per_token"], r["ppl"], **style)
        axes[0].annotate(name, (r["flops_per_token"], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if r.get("cloze"):
            low, high = r["cloze"]["ci95"]
            acc = r["cloze"]["acc"]
            axes[1].errorbar(r["flops_per_token"], acc, yerr=[[acc - low], [high - acc]], capsize=3, **style)
            axes[1].annotate(name, (r["flops_per_token"], acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    named = sorted((r["flops_per_token"], r["ppl"]) for r in widths.values() if isinstance(r["ffn"], int))
    axes[0].plot([f for f, _ in named], [p for _, p in named], color="tab:blue", alpha=0.5)
    axes[0].set(xlabel="FLOPs / token", ylabel="held-out perplexity (lower is better)", title="perplexity")
    axes[1].set(xlabel="FLOPs / token", ylabel="whole-word cloze accuracy (95% CI)", title="cloze")
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


def save_figure(fig, path: str | Path, title: str) -> Path:
    """Title, lay out, write (making the folder) and close a figure; its path."""
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
