"""The accounting both sides share, against values computed by hand."""

import pytest

from sitesagent import protocol


def test_svt_costs_the_sum_of_its_three_parts():
    params = {
        "fraction": 0.1,
        "gamma": 0.01,
        "tau": 0.0,
        "eps_threshold": 0.1,
        "eps_query": 0.4,
        "eps_release": 0.5,
    }
    assert protocol.round_epsilon("svt", params) == pytest.approx(1.0)


def test_unprotected_mechanisms_have_no_epsilon_at_all():
    assert protocol.round_epsilon("none", {}) is None
    assert protocol.round_epsilon("partial", {"fraction": 0.1, "gamma": 0.01}) is None


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("eps_release", -1, "greater than zero"),
        ("eps_release", 0, "greater than zero"),
        ("eps_query", float("nan"), "NaN"),
        ("eps_threshold", float("inf"), "finite"),
        ("gamma", "a lot", "number"),
        ("fraction", 1.5, "at most 1"),
        ("tau", True, "number"),
    ],
)
def test_bad_parameters_are_refused_by_name(name, value, words):
    params = {
        "fraction": 0.1,
        "gamma": 0.01,
        "tau": 0.0,
        "eps_threshold": 0.1,
        "eps_query": 0.4,
        "eps_release": 0.5,
    }
    params[name] = value
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.round_epsilon("svt", params)
    assert name in str(caught.value) and words in str(caught.value)


def test_missing_and_unknown_parameters_are_named():
    with pytest.raises(protocol.ProtocolError, match="needs the parameter gamma"):
        protocol.validate_mechanism("partial", {"fraction": 0.1})
    with pytest.raises(protocol.ProtocolError, match="no parameter eps_release"):
        protocol.validate_mechanism("partial", {"fraction": 0.1, "gamma": 1, "eps_release": 1})
    with pytest.raises(protocol.ProtocolError, match="mechanism must be one of"):
        protocol.validate_mechanism("laplace", {})


def test_selection_count_is_the_ceiling_of_q_n():
    assert protocol.selection_count(0.1, 10) == 1
    assert protocol.selection_count(0.1, 11) == 2
    assert protocol.selection_count(0.1, 4_700_000) == 470_000
    assert protocol.selection_count(1.0, 7) == 7


def test_default_split_follows_one_to_2c_to_the_two_thirds():
    split = protocol.svt_split(2.0, fraction=0.1, n_parameters=1000, release_share=0.5)
    c = 100
    assert split["eps_release"] == pytest.approx(1.0)
    assert split["eps_query"] / split["eps_threshold"] == pytest.approx((2 * c) ** (2 / 3))
    assert sum(split.values()) == pytest.approx(2.0)


def test_noise_scales_by_hand():
    params = {
        "fraction": 0.5,
        "gamma": 0.2,
        "tau": 0.0,
        "eps_threshold": 0.1,
        "eps_query": 0.4,
        "eps_release": 0.5,
    }
    scales = protocol.svt_noise_scales(params, n_parameters=10)  # c = 5
    assert scales["threshold"] == pytest.approx(0.2 / 0.1)
    assert scales["query"] == pytest.approx(2 * 5 * 0.2 / 0.4)
    assert scales["release"] == pytest.approx(2 * 5 * 0.2 / 0.5)


def test_flat_layout_is_sorted_by_name_whatever_the_order_given():
    layout = protocol.flat_layout({"b": (2, 3), "a": (4,), "c": ()})
    assert layout == [("a", 0, 4), ("b", 4, 10), ("c", 10, 11)]


def test_svt_cost_is_exact_in_decimal():
    from decimal import Decimal

    params = {
        "fraction": 0.1,
        "gamma": 0.01,
        "tau": 0.0,
        "eps_threshold": 0.05,
        "eps_query": 0.15,
        "eps_release": 0.1,
    }
    assert protocol.round_epsilon_exact("svt", params) == Decimal("0.3")
