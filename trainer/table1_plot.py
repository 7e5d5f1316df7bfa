"""``table1.png``: accuracy of every Table 1 row against its trainable parameters (log axis).

Decisions: points on a log x axis rather than bars, because the rows' sizes span five decades (a head of a
few hundred parameters up to the whole backbone) and the question the table answers is "how much accuracy
per trained parameter". Each point carries its row's short label; the prefix lengths of one init are joined
by a line so the trend in P reads at a glance; full fine-tuning is also drawn as a dashed reference line.
matplotlib (an extra: bench/dev) is imported lazily with the Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# family -> (colour, marker); a row's family comes from what it trains, see _family
_STYLE = {
    "probe": ("tab:gray", "s"),
    "prefix": ("tab:blue", "o"),
    "prefix, MLM init": ("tab:orange", "o"),
    "prefix, --init-from": ("tab:purple", "o"),
    "other adapters": ("tab:green", "^"),
    "full fine-tuning": ("tab:red", "*"),
    "prefix + fine-tuning": ("tab:red", "D"),
}


def _family(row: dict[str, Any]) -> str:
    if row["train_backbone"]:
        return "prefix + fine-tuning" if row["kind"] == "prefix" else "full fine-tuning"
    if row["kind"] is None:
        return "probe"
    if row["kind"] != "prefix":
        return "other adapters"
    if row.get("mlm_pretrained"):
        return "prefix, MLM init"
    return "prefix, --init-from" if row.get("init_from") else "prefix"


def _label_above(row: dict[str, Any], rows: list[dict[str, Any]], family: list[dict[str, Any]]) -> bool:
    """Where a point's label goes. A row sharing its x with another (a prefix and its MLM-init twin, FT and
    prefix + FT of about the same size) is labelled above if it is the higher of the two (ties: the earlier row),
    the other below. Otherwise above if it is higher than its family neighbours' mean (the label points away
    from the joining line), else below; a lone point goes above."""
    twins = [r for r in rows if r is not row and abs(r["trainable_params"] / row["trainable_params"] - 1) < 0.05]
    if twins:
        other = twins[0]
        if row["accuracy"] != other["accuracy"]:
            return bool(row["accuracy"] > other["accuracy"])
        return rows.index(row) < rows.index(other)
    ordered = sorted(family, key=lambda r: r["trainable_params"])
    at = ordered.index(row)
    neighbours = [ordered[i]["accuracy"] for i in (at - 1, at + 1) if 0 <= i < len(ordered)]
    return not neighbours or bool(row["accuracy"] >= sum(neighbours) / len(neighbours))


def _title(report: dict[str, Any]) -> str:
    name = str(report["backbone"]["name"])
    shown = "/".join(Path(name).parts[-2:]) if Path(name).exists() else name  # a local folder: its last parts
    cfg = report["config"]
    bits = [f"max_length {cfg['max_length']}", f"epochs <= {cfg['epochs']}"]
    if report["rows"]:
        first = report["rows"][0]
        bits.insert(0, f"{first['train_rows']:,} train / {first['eval_rows']:,} eval rows")
    return f"Table 1: {shown} on {Path(cfg['train']).name}\n" + ", ".join(bits)


def plot_table1(report: dict[str, Any], path: str | Path) -> list[str]:
    """Write the PNG; returns the labels drawn, one per row with an accuracy (in table order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    drawn: list[str] = []
    by_family: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_family.setdefault(_family(r), []).append(r)
    for family, members in by_family.items():
        colour, marker = _STYLE[family]
        xs = [r["trainable_params"] for r in members]
        ys = [100 * r["accuracy"] for r in members]
        joined = family.startswith("prefix") and "fine-tuning" not in family and len(members) > 1
        ax.plot(
            xs,
            ys,
            linestyle="-" if joined else "none",
            marker=marker,
            color=colour,
            markersize=12 if marker == "*" else 7,
            markerfacecolor="none" if family == "prefix + fine-tuning" else colour,  # hollow: FT's star shows through
            markeredgewidth=1.5,
            label=family,
            zorder=3,
        )
    for r in rows:
        x, y = r["trainable_params"], 100 * r["accuracy"]
        dy = 9 if _label_above(r, rows, by_family[_family(r)]) else -15
        ax.annotate(
            f"{r['label']}  {y:.1f}",
            (x, y),
            textcoords="offset points",
            xytext=(6, dy),
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},  # readable over lines
            zorder=4,
        )
        drawn.append(r["label"])
    ft = next((r for r in rows if _family(r) == "full fine-tuning"), None)
    if ft is not None:
        ax.axhline(
            100 * ft["accuracy"],
            linestyle="--",
            linewidth=1,
            color="tab:red",
            alpha=0.5,
            label="full fine-tuning level",
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + head; log scale)")
    ax.set_ylabel("eval accuracy (%)")
    if rows:
        lo, hi = min(100 * r["accuracy"] for r in rows), max(100 * r["accuracy"] for r in rows)
        ax.set_ylim(lo - 3, hi + 3)  # room for the labels above and below the extreme points
    ax.set_title(_title(report), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return drawn
