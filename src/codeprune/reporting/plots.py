"""Plots (matplotlib, PNG, no display needed): heatmaps for ``compare``, scatter plots for ``report``,
loss curves for ``recover``."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt


def heatmap(values: list[list[float | None]], rows: list[str], cols: list[str], path: str | Path, *,
            title: str, xlabel: str = "", ylabel: str = "", fmt: str = "{:.3g}", cmap: str = "viridis",
            colors: list[list[float | None]] | None = None, colorbar: str = "") -> Path:
    """A labelled heatmap with each cell's value written in it; ``colors`` (same shape)
    sets the colour when it should show something else than the printed value."""
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in (colors or values)], dtype=float)
    w = min(14.0, max(4.5, 0.9 * len(cols) + 2.5))
    h = min(14.0, max(3.2, 0.35 * len(rows) + 1.8))
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(data, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(rows) * len(cols) <= 400:
        size = 7 if len(rows) > 20 else 8
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if v is not None and np.isfinite(data[i, j]):
                    r, g, b, _ = im.cmap(im.norm(data[i, j]))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=size,
                            color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label=colorbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def scatter(points: list[tuple[str, float, float]], path: str | Path, *, title: str, xlabel: str,
            ylabel: str, logy: bool = False) -> Path:
    """Labelled points (label, x, y)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, x, y in points:
        ax.scatter([x], [y], s=30)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path, *, title: str) -> Path:
    """Loss against step, one line per curve (``{"train": [(step, loss)], "eval": [...]}``)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in curves.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if name == "eval" else None,
                    label=f"{name} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
