"""Plotly figures as plain dicts, built from query results. Pure: no database, no request.

Pages embed a figure with ``json_script`` and plotly.js (served from static/) draws it; live
pages then extend its traces with the points that websocket messages carry. Traces of per-site
series carry ``meta = {"site": id, "metric": name}`` so the browser can find the one to extend.

plotly reads trace names, hover templates and axis labels as markup (``<a href>``, ``<b>``...),
and site names are chosen by whoever registers a site: every name from data goes through
``plain`` so that it is drawn as the text it is (static/js/charts.js does the same for traces
added live).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

DICE_METRICS = ("dice_et", "dice_wt", "dice_tc", "dice_mean")
DICE_LABELS = {
    "dice_et": "Enhancing tumour (ET)",
    "dice_wt": "Whole tumour (WT)",
    "dice_tc": "Tumour core (TC)",
    "dice_mean": "Mean",
}
# Colour-blind-safe (Okabe-Ito), in the order sites and series are drawn.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
DICE_COLOURS = {"dice_et": "#D55E00", "dice_wt": "#0072B2", "dice_tc": "#009E73", "dice_mean": "#000000"}
BUDGET_COLOURS = {"committed": "#D55E00", "reserved": "#E69F00", "remaining": "#009E73"}

Figure = dict[str, Any]


def plain(text: Any) -> str:
    """``text`` as plotly shows it literally: its markup characters as entities."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _layout(title: str, *, x: str, y: str, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "title": {"text": title, "x": 0, "xanchor": "left", "font": {"size": 15}},
        "xaxis": {"title": {"text": x}, "zeroline": False},
        "yaxis": {"title": {"text": y}, "zeroline": False},
        "margin": {"l": 60, "r": 20, "t": 44, "b": 100},
        "height": 360,
        "legend": {"orientation": "h", "x": 0, "y": -0.24, "yanchor": "top"},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "font": {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 12},
    }
    for axis in ("xaxis", "yaxis"):
        layout[axis].update(gridcolor="#e8ecf1", linecolor="#c4ccd6")
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(layout.get(key), dict):
            layout[key] = {**layout[key], **value}
        else:
            layout[key] = value
    return layout


def _with_note(figure: Figure, note: str) -> Figure:
    """An empty figure says why it is empty instead of showing bare axes."""
    figure["layout"]["annotations"] = [
        {
            "text": note,
            "showarrow": False,
            "xref": "paper",
            "yref": "paper",
            "x": 0.5,
            "y": 0.5,
            "font": {"size": 13, "color": "#6b7785"},
        }
    ]
    return figure


def _number(value: Decimal | float | int | None) -> float | None:
    return None if value is None else float(value)


# --- Federated evaluation -----------------------------------------------------------------------


def federated_dice(points: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Dice per metric and round, averaged across sites weighted by each site's case count.

    ``points``: one per (round, site, metric) with keys ``round`` (its number), ``site``,
    ``name`` (dice_et, dice_wt, dice_tc, dice_mean), ``value`` and ``cases`` (the weight).
    A site reporting without a case count weighs as one case.
    """
    sums: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for point in points:
        if point["name"] not in DICE_METRICS:
            continue
        weight = float(point.get("cases") or 1)
        total = sums[(point["name"], point["round"])]
        total[0] += weight * float(point["value"])
        total[1] += weight
    series: dict[str, list[tuple[int, float]]] = {name: [] for name in DICE_METRICS}
    for (name, round_number), (weighted, weight) in sorted(sums.items(), key=lambda item: item[0][1]):
        series[name].append((round_number, weighted / weight))
    return series


def dice_over_rounds(points: Iterable[Mapping[str, Any]], *, title: str = "Federated Dice") -> Figure:
    """One line per region (ET, WT, TC) and their mean, over rounds."""
    series = federated_dice(points)
    traces = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": DICE_LABELS[name],
            "x": [round_number for round_number, _ in series[name]],
            "y": [round(value, 4) for _, value in series[name]],
            "line": {"color": DICE_COLOURS[name], "width": 3 if name == "dice_mean" else 2},
            "hovertemplate": f"round %{{x}}<br>{DICE_LABELS[name]}: %{{y:.3f}}<extra></extra>",
        }
        for name in DICE_METRICS
    ]
    figure = {
        "data": traces,
        "layout": _layout(
            title,
            x="round (its base model, evaluated at each site)",
            y="Dice",
            yaxis={"range": [0, 1]},
            xaxis={"dtick": 1},
        ),
    }
    if not any(series.values()):
        return _with_note(figure, "No evaluation results yet")
    return figure


def dice_heatmap(points: Iterable[Mapping[str, Any]], *, metric: str = "dice_mean") -> Figure:
    """Sites (rows) by rounds (columns), coloured by one Dice metric; gaps where none came."""
    values: dict[tuple[str, int], float] = {}
    for point in points:
        if point["name"] == metric:
            values[(point["site"], point["round"])] = float(point["value"])
    sites = sorted({site for site, _ in values})
    rounds = sorted({round_number for _, round_number in values})
    z = [[_rounded(values.get((site, round_number))) for round_number in rounds] for site in sites]
    figure = {
        "data": [
            {
                "type": "heatmap",
                "x": rounds,
                "y": [plain(site) for site in sites],
                "z": z,
                "zmin": 0,
                "zmax": 1,
                "colorscale": "Viridis",
                "colorbar": {"title": {"text": "Dice"}},
                "hovertemplate": "%{y}<br>round %{x}<br>Dice: %{z:.3f}<extra></extra>",
                "xgap": 2,
                "ygap": 2,
            }
        ],
        "layout": _layout(
            f"{DICE_LABELS.get(metric, metric)} Dice per site",
            x="round",
            y="",
            xaxis={"dtick": 1, "type": "category"},
            yaxis={"automargin": True},
            height=max(220, 90 + 36 * len(sites)),
            margin={"b": 50},
        ),
    }
    if not sites:
        return _with_note(figure, "No evaluation results yet")
    return figure


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# --- Privacy ------------------------------------------------------------------------------------


def epsilon_spent(commits: Iterable[Mapping[str, Any]]) -> Figure:
    """Each site's committed epsilon after each round, as the accountant composes it (what is
    enforced; not a sum).

    ``commits``: in ledger order, each with ``round`` (number), ``site``, ``spent`` (the site's
    epsilon right after it) and ``protected`` (False for a round with no formal guarantee: drawn as
    a cross at the level the site had reached, never as a number).
    """
    lines: dict[str, dict[str, list]] = {}
    unprotected: dict[str, dict[str, list]] = {}
    for commit in commits:
        site = commit["site"]
        line = lines.setdefault(site, {"x": [], "y": []})
        if not commit["protected"]:
            marks = unprotected.setdefault(site, {"x": [], "y": []})
            marks["x"].append(commit["round"])
            marks["y"].append(line["y"][-1] if line["y"] else 0.0)
            continue
        line["x"].append(commit["round"])
        line["y"].append(float(commit["spent"]))
    traces = []
    for index, site in enumerate(sorted(lines)):
        colour, label = PALETTE[index % len(PALETTE)], plain(site)
        traces.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": label,
                "x": lines[site]["x"],
                "y": lines[site]["y"],
                "line": {"color": colour, "shape": "hv"},
                "hovertemplate": f"{label}<br>after round %{{x}}: ε = %{{y:.4g}}<extra></extra>",
            }
        )
        if site in unprotected:
            traces.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": f"{label}: no formal guarantee",
                    "x": unprotected[site]["x"],
                    "y": unprotected[site]["y"],
                    "marker": {"symbol": "x", "size": 11, "color": colour},
                    "hovertemplate": f"{label}<br>round %{{x}}: no formal guarantee<extra></extra>",
                }
            )
    figure = {
        "data": traces,
        "layout": _layout(
            "Epsilon spent per site",
            x="round",
            y="ε committed (accountant)",
            xaxis={"dtick": 1},
            showlegend=True,
        ),
    }
    if not traces:
        return _with_note(figure, "No epsilon committed yet")
    return figure


def budget_bars(rows: Iterable[Mapping[str, Any]]) -> Figure:
    """Stacked bars per site: committed, reserved and remaining epsilon (together the budget)."""
    rows = list(rows)
    sites = [plain(row["site"]) for row in rows]
    traces = []
    for part in ("committed", "reserved", "remaining"):
        traces.append(
            {
                "type": "bar",
                "orientation": "h",
                "name": part,
                "y": sites,
                "x": [max(0.0, float(row[part])) for row in rows],
                "marker": {"color": BUDGET_COLOURS[part]},
                "hovertemplate": f"%{{y}}<br>{part}: ε %{{x:.4g}}<extra></extra>",
            }
        )
    figure = {
        "data": traces,
        "layout": _layout(
            "Privacy budget per site",
            x="ε",
            y="",
            barmode="stack",
            yaxis={"automargin": True, "autorange": "reversed"},
            height=max(200, 110 + 40 * len(sites)),
        ),
    }
    if not rows:
        return _with_note(figure, "No sites yet")
    return figure


# --- Live round ---------------------------------------------------------------------------------


def site_series(series: Iterable[Mapping[str, Any]], *, metric: str, title: str, y: str) -> Figure:
    """One trace per site of a metric streamed during training (loss, throughput) over steps.

    ``series``: one per site with ``site_id``, ``site`` (name) and ``points`` [(step, value)].
    Every site gets a trace, even before its first point, so live points always have a home.
    """
    traces = []
    for index, one in enumerate(series):
        points, label = sorted(one["points"]), plain(one["site"])
        traces.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": label,
                "x": [step for step, _ in points],
                "y": [value for _, value in points],
                "line": {"color": PALETTE[index % len(PALETTE)], "width": 2},
                "meta": {"site": one["site_id"], "metric": metric},
                "hovertemplate": f"{label}<br>step %{{x}}: %{{y:.4g}}<extra></extra>",
            }
        )
    return {"data": traces, "layout": _layout(title, x="training step", y=y, height=340)}
