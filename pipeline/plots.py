"""The report's PNGs: line plots of per-step series and a grouped bar chart. Each returns False
(and writes nothing) when it has no data, so a report of a partial run has only real plots."""

from __future__ import annotations

from pathlib import Path

Series = tuple[list[int], list[float]]


def _pyplot():
    import matplotlib  # lazy: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def curves(path: Path, title: str, xlabel: str, left: dict[str, Series],
           right: dict[str, Series] | None = None) -> bool:
    """One line per series; `right` ones on a second y axis (e.g. bits/byte beside loss)."""
    left = {k: v for k, v in left.items() if v[0]}
    right = {k: v for k, v in (right or {}).items() if v[0]}
    if not left and not right:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in left.items():
        ax.plot(x, y, label=label, marker="." if len(x) < 40 else None)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        twin = ax.twinx()
        for label, (x, y) in right.items():
            twin.plot(x, y, label=label, color="black", linestyle="--", marker="o")
        twin.set_ylabel(", ".join(right))
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def bar_chart(path: Path, title: str, groups: list[str], bars: dict[str, list[float]]) -> bool:
    """Bars per group (domain), one colour per entry (checkpoint)."""
    if not bars or not groups:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * len(bars) / 4), 4))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        xs = [g + (i - (len(bars) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass@1")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True
