"""Charts are pure functions from query results to plotly figure dicts: tested as data.

Each figure is also handed to plotly's own validator, so a misspelt attribute fails here rather
than silently in the browser.
"""

from __future__ import annotations

import json
from decimal import Decimal

import plotly.graph_objects as go
import pytest

from coordinator import charts


def valid(figure: dict) -> dict:
    go.Figure(figure)  # raises on any property plotly.js does not know
    json.dumps(figure)  # embeddable as it is
    return figure


def dice(round_number, site, name, value, cases):
    return {"round": round_number, "site": site, "name": name, "value": value, "cases": cases}


def test_federated_dice_weighs_each_site_by_its_cases():
    points = [
        dice(1, "A", "dice_wt", 0.5, 10),
        dice(1, "B", "dice_wt", 0.9, 30),
        dice(2, "A", "dice_wt", 0.7, 10),
    ]
    series = charts.federated_dice(points)
    assert series["dice_wt"] == [(1, pytest.approx(0.8)), (2, pytest.approx(0.7))]
    assert series["dice_et"] == []


def test_a_site_without_a_case_count_weighs_as_one_case():
    series = charts.federated_dice([dice(1, "A", "dice_et", 0.0, None), dice(1, "B", "dice_et", 1.0, 3)])
    assert series["dice_et"] == [(1, pytest.approx(0.75))]


def test_federated_dice_is_ordered_by_round_whatever_the_input_order():
    points = [
        dice(3, "A", "dice_mean", 0.3, 1),
        dice(1, "A", "dice_mean", 0.1, 1),
        dice(2, "A", "dice_mean", 0.2, 1),
    ]
    assert [r for r, _ in charts.federated_dice(points)["dice_mean"]] == [1, 2, 3]


def test_dice_over_rounds_has_one_line_per_region_and_the_mean():
    points = [dice(1, "A", name, 0.5, 5) for name in charts.DICE_METRICS]
    figure = valid(charts.dice_over_rounds(points))
    assert [t["name"] for t in figure["data"]] == [
        "Enhancing tumour (ET)",
        "Whole tumour (WT)",
        "Tumour core (TC)",
        "Mean",
    ]
    assert all(t["x"] == [1] and t["y"] == [0.5] for t in figure["data"])
    assert figure["layout"]["yaxis"]["range"] == [0, 1]
    assert "annotations" not in figure["layout"]


def test_an_empty_chart_says_why():
    figure = valid(charts.dice_over_rounds([]))
    assert figure["layout"]["annotations"][0]["text"] == "No evaluation results yet"
    assert valid(charts.dice_heatmap([]))["layout"]["annotations"][0]["text"] == "No evaluation results yet"
    assert valid(charts.epsilon_spent([]))["layout"]["annotations"][0]["text"] == "No epsilon committed yet"


def test_heatmap_puts_sites_in_rows_and_rounds_in_columns_with_gaps():
    points = [
        dice(1, "B", "dice_mean", 0.4, 1),
        dice(2, "B", "dice_mean", 0.6, 1),
        dice(2, "A", "dice_mean", 0.5, 1),
        dice(2, "A", "dice_et", 0.9, 1),  # another metric: not in this map
    ]
    trace = valid(charts.dice_heatmap(points))["data"][0]
    assert trace["y"] == ["A", "B"] and trace["x"] == [1, 2]
    assert trace["z"] == [[None, 0.5], [0.4, 0.6]]
    assert (trace["zmin"], trace["zmax"]) == (0, 1)


def test_epsilon_spent_draws_the_accountants_figure_after_each_commit():
    commits = [
        {"round": 1, "site": "A", "spent": 0.1, "protected": True},
        {"round": 1, "site": "B", "spent": 1.0, "protected": True},
        {"round": 2, "site": "A", "spent": 0.3, "protected": True},
        {"round": 3, "site": "A", "spent": 0.3, "protected": False},
        {"round": 4, "site": "A", "spent": 0.55, "protected": True},
    ]
    figure = valid(charts.epsilon_spent(commits))
    traces = {t["name"]: t for t in figure["data"]}
    assert traces["A"]["x"] == [1, 2, 4] and traces["A"]["y"] == [0.1, 0.3, 0.55]
    assert traces["B"]["y"] == [1.0]
    unprotected = traces["A: no formal guarantee"]
    assert unprotected["x"] == [3] and unprotected["y"] == [0.3]
    assert unprotected["marker"]["symbol"] == "x"
    assert "no formal guarantee" in unprotected["hovertemplate"]
    assert "accountant" in figure["layout"]["yaxis"]["title"]["text"]


def test_budget_bars_stack_committed_reserved_and_remaining():
    rows = [
        {"site": "A", "committed": Decimal(1), "reserved": Decimal("0.5"), "remaining": Decimal("0.5")},
        {"site": "B", "committed": Decimal(0), "reserved": Decimal(0), "remaining": Decimal(2)},
    ]
    figure = valid(charts.budget_bars(rows))
    assert figure["layout"]["barmode"] == "stack"
    assert {t["name"]: t["x"] for t in figure["data"]} == {
        "committed": [1.0, 0.0],
        "reserved": [0.5, 0.0],
        "remaining": [0.5, 2.0],
    }
    assert all(t["y"] == ["A", "B"] and t["orientation"] == "h" for t in figure["data"])


def test_an_overdrawn_budget_draws_no_negative_bar():
    rows = [{"site": "A", "committed": Decimal(3), "reserved": Decimal(0), "remaining": Decimal(-1)}]
    remaining = next(t for t in valid(charts.budget_bars(rows))["data"] if t["name"] == "remaining")
    assert remaining["x"] == [0.0]


def test_site_series_gives_every_site_a_trace_tagged_for_live_updates():
    series = [
        {"site_id": 7, "site": "A", "points": [(2, 0.5), (1, 0.9)]},
        {"site_id": 9, "site": "B", "points": []},
    ]
    figure = valid(charts.site_series(series, metric="train_loss", title="Training loss", y="loss"))
    a, b = figure["data"]
    assert (a["x"], a["y"], a["meta"]) == ([1, 2], [0.9, 0.5], {"site": 7, "metric": "train_loss"})
    assert (b["x"], b["y"], b["meta"]) == ([], [], {"site": 9, "metric": "train_loss"})
    assert a["line"]["color"] != b["line"]["color"]
    assert figure["layout"]["title"]["text"] == "Training loss"


# --- Names from data are text, never markup ------------------------------------------------------

MARKUP_NAME = '<a href="https://attacker.example/">Evil & co</a>'
ESCAPED = '&lt;a href="https://attacker.example/"&gt;Evil &amp; co&lt;/a&gt;'


def test_a_site_named_with_markup_is_drawn_as_text_in_every_chart():
    series = [{"site_id": 1, "site": MARKUP_NAME, "points": [(1, 0.5)]}]
    loss = charts.site_series(series, metric="train_loss", title="Loss", y="loss")
    assert loss["data"][0]["name"] == ESCAPED
    assert loss["data"][0]["hovertemplate"].startswith(ESCAPED + "<br>")
    spent = charts.epsilon_spent([{"round": 1, "site": MARKUP_NAME, "spent": 1.0, "protected": True}])
    assert spent["data"][0]["name"] == ESCAPED
    bars = charts.budget_bars([{"site": MARKUP_NAME, "committed": 1, "reserved": 0, "remaining": 1}])
    assert bars["data"][0]["y"] == [ESCAPED]
    heatmap = charts.dice_heatmap([{"round": 1, "site": MARKUP_NAME, "name": "dice_mean", "value": 0.5}])
    assert heatmap["data"][0]["y"] == [ESCAPED]
    text = json.dumps([loss, spent, bars, heatmap])
    assert "<a " not in text
