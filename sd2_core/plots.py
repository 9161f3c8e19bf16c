"""The sweep's plots, drawn from the results table alone (PNG files, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import pandas as pd  # noqa: E402

STAGE_STYLE = {"one_shot": ("one-shot", "tab:orange"), "sd2": ("SD²", "tab:blue")}


def _label(frame: pd.DataFrame) -> pd.Series:
    """Short row labels: the variant, prefixed by draft and target only where the grid has several."""
    parts = [frame["variant"]]
    if frame["draft"].nunique() > 1:
        parts.insert(0, frame["draft"].map(lambda d: str(d).rstrip("/").rsplit("/", 1)[-1]))
    if frame["target"].nunique() > 1:
        parts.insert(0, frame["target"].map(lambda t: "→" + str(t).rstrip("/").rsplit("/", 1)[-1]))
    label = parts[0].astype(str)
    for p in parts[1:]:
        label = label + " " + p.astype(str)
    return label


def _grouped_bars(
    frame: pd.DataFrame, column: str, ylabel: str, title: str, out: Path, interval: tuple[str, str] | None = None
) -> Path:
    """Bars per variant, one-shot beside SD²; `interval` names the (low, high) columns drawn as error bars."""
    frame = frame.assign(label=_label(frame))
    wide = frame.pivot_table(index="label", columns="stage", values=column, sort=False)
    bounds = None
    if interval and frame[interval[0]].notna().any():
        bounds = [frame.pivot_table(index="label", columns="stage", values=c, sort=False) for c in interval]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(wide) + 2), 3.8))
    width = 0.38
    for i, stage in enumerate(s for s in STAGE_STYLE if s in wide.columns):
        name, color = STAGE_STYLE[stage]
        xs = [j + (i - 0.5) * width for j in range(len(wide))]
        yerr = None
        if bounds is not None:
            values = wide[stage].values
            low, high = (b.reindex(wide.index)[stage].values for b in bounds)
            yerr = [values - low, high - values]
        bars = ax.bar(xs, wide[stage].values, width, label=name, color=color, yerr=yerr, capsize=3)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(wide)), wide.index, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def mal_vs_macs(frame: pd.DataFrame, out: Path) -> Path:
    frame = frame.assign(label=_label(frame))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stage, (name, color) in STAGE_STYLE.items():
        part = frame[frame["stage"] == stage]
        ax.scatter(part["macs_per_token_draft"] / 1e6, part["mal"], label=name, color=color)
        for _, row in part.iterrows():
            ax.annotate(
                row["label"],
                (row["macs_per_token_draft"] / 1e6, row["mal"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("draft MACs per token (millions)")
    ax.set_ylabel("mean accepted length")
    ax.set_title("MAL vs draft cost")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def draw_all(frame: pd.DataFrame, folder: Path) -> list[Path]:
    """Every plot of the finished rows; none when no cell finished."""
    done = frame[frame["status"] == "completed"]
    if done.empty:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    return [
        mal_vs_macs(done, folder / "mal_vs_macs.png"),
        _grouped_bars(
            done,
            "improvement_factor_theoretical",
            "MAL / (k·c + 1)",
            "Theoretical improvement factor per variant",
            folder / "improvement_factor.png",
        ),
        _grouped_bars(
            done,
            "mal",
            "mean accepted length",
            "MAL one-shot vs SD² per variant (95 % bootstrap CI)",
            folder / "mal.png",
            interval=("mal_lo", "mal_hi"),
        ),
        *_evaluation_plots(done, folder),
    ]


def _evaluation_plots(done: pd.DataFrame, folder: Path) -> list[Path]:
    """Accuracy and perplexity bars, where the cells measured them."""
    plots = []
    if done["improvement_factor_practical"].notna().any():
        title = "Practical improvement factor MAL / (k·c_lat + 1), measured latency"
        plots.append(
            _grouped_bars(done, "improvement_factor_practical", "speed-up", title, folder / "improvement_practical.png")
        )
    if done["acc_average"].notna().any():
        title = "OpenLLM-v1 average accuracy (lm-eval)"
        plots.append(_grouped_bars(done, "acc_average", "accuracy", title, folder / "accuracy.png"))
    if done["perplexity"].notna().any():
        title = "WikiText-2 perplexity (lower is better)"
        plots.append(_grouped_bars(done, "perplexity", "perplexity", title, folder / "perplexity.png"))
    return plots
