"""The accountant both sides use, against dp-accounting itself; the ledger's figures against the
accountant's on the same events; and (epsilon, delta) budgets enforced at launch."""

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import common, pld_privacy_accountant, privacy_loss_distribution

from coordinator import accounting, services
from coordinator.models import LedgerEntry, LedgerKind, Membership, Round
from sitesagent import accountant, protocol

from .conftest import join

DPSGD = {"noise_multiplier": 1.2, "max_grad_norm": 1.0, "sample_rate": 0.2, "steps": 10, "crops_per_case": 1}


def _pure(epsilon):
    return {"kind": "pure", "epsilon": epsilon}


def _library_pure(epsilon, count, delta):
    """The library alone, at its own default (finer) discretisation."""
    pld = privacy_loss_distribution.from_privacy_parameters(common.DifferentialPrivacyParameters(epsilon, 0))
    return pld.self_compose(count).get_epsilon_for_delta(delta)


def test_600_rounds_of_pure_epsilon_point_1_compose_to_the_libraries_12_8():
    ours = accountant.composed_epsilon([_pure(0.1)] * 600, 1e-5)
    assert ours == pytest.approx(_library_pure(0.1, 600, 1e-5), abs=5e-4)
    assert ours == pytest.approx(12.8, abs=0.01)
    rho = 600 * 0.1**2 / 2
    zcdp = rho + 2 * math.sqrt(rho * math.log(1e5))
    assert zcdp == pytest.approx(14.75, abs=0.01)
    assert ours < zcdp < 60  # tighter than the zCDP bound, far below the plain sum


def test_dpsgd_rounds_match_the_libraries_own_pld_accountant():
    event = protocol.round_event(protocol.MECHANISM_DPSGD, DPSGD)
    library = pld_privacy_accountant.PLDAccountant()
    library.compose(dp_event.PoissonSampledDpEvent(0.2, dp_event.GaussianDpEvent(1.2)), 10 * 7)
    expected = library.get_epsilon(1e-5)
    assert accountant.composed_epsilon([event] * 7, 1e-5) == pytest.approx(expected, rel=1e-3)


def test_mixed_events_compose_as_the_library_composes_them():
    gaussian = privacy_loss_distribution.from_gaussian_mechanism(1.2, sampling_prob=0.2).self_compose(30)
    pure = privacy_loss_distribution.from_privacy_parameters(common.DifferentialPrivacyParameters(0.5, 0))
    expected = gaussian.compose(pure.self_compose(2)).get_epsilon_for_delta(1e-5)
    event = protocol.round_event(protocol.MECHANISM_DPSGD, DPSGD)
    ours = accountant.composed_epsilon([event, _pure(0.5), event, event, _pure(0.5)], 1e-5)
    assert ours == pytest.approx(expected, rel=1e-3)


def test_at_delta_zero_pure_rounds_add_up_exactly_and_gaussian_ones_are_infinite():
    assert accountant.composed_epsilon([_pure(0.3)] * 6, 0) == 1.8  # not 1.7999999999999998
    event = protocol.round_event(protocol.MECHANISM_DPSGD, DPSGD)
    assert accountant.composed_epsilon([_pure(0.3), event], 0) == math.inf


def test_pure_rounds_too_large_for_a_pld_are_added_by_basic_composition():
    event = protocol.round_event(protocol.MECHANISM_DPSGD, DPSGD)
    alone = accountant.composed_epsilon([event], 1e-5)
    assert accountant.composed_epsilon([_pure(1e5), _pure(1e5), event], 1e-5) == pytest.approx(2e5 + alone)


def test_rounds_within_is_the_last_count_that_fits():
    event = protocol.round_event(protocol.MECHANISM_DPSGD, DPSGD)
    history = [event, event]
    n = accountant.rounds_within(history, event, delta=1e-5, budget=8)
    assert n >= 1
    assert accountant.composed_epsilon(history + [event] * n, 1e-5) <= 8
    assert accountant.composed_epsilon(history + [event] * (n + 1), 1e-5) > 8


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "pure", "epsilon": float("nan")},
        {"kind": "pure", "epsilon": -1},
        {"kind": "poisson_gaussian", "sample_rate": 2, "noise_multiplier": 1, "steps": 1},
        {"kind": "poisson_gaussian", "sample_rate": 0.1, "noise_multiplier": 1, "steps": 1.5},
        {"kind": "laplace", "epsilon": 1},
    ],
)
def test_an_unusable_event_is_refused_by_name(bad):
    with pytest.raises(protocol.ProtocolError):
        accountant.composed_epsilon([bad], 1e-5)


# --- the ledger -------------------------------------------------------------------------------------


@pytest.fixture
def dpsgd_federation(alice):
    return services.federation_create(
        name="DP-SGD study",
        created_by=alice,
        model_config={"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1], "norm_groups": 8},
        default_mechanism=protocol.MECHANISM_DPSGD,
        default_mechanism_params=DPSGD,
        budget_delta=1e-5,
        training_defaults={"local_epochs": 0, "max_iterations": 2, "roi_size": 16},
    )


def _member(federation, alice, name, budget, **options):
    site, _ = services.site_register(name=name, registered_by=alice)
    return join(federation, site, budget=budget, added_by=alice, accepted_by=alice, **options)


def test_a_sites_ledger_epsilon_is_the_accountants_on_the_same_events(alice, dpsgd_federation):
    membership = _member(dpsgd_federation, alice, "Hospital D", 50)
    for _ in range(3):
        round_ = services.round_launch(federation=dpsgd_federation, launched_by=alice)
        services.round_abort(round_=round_, aborted_by=alice, reason="only reserving")
    round_ = services.round_launch(federation=dpsgd_federation, launched_by=alice)
    balance = accounting.membership_balance(membership)
    events = [e.dp_event for e in LedgerEntry.objects.filter(membership=membership, kind=LedgerKind.RESERVE)]
    assert len(events) == 4 and all(event == round_.dp_event for event in events)
    # Three reservations were released, one is open: nothing committed, one round held.
    assert balance.committed == 0
    held = accountant.composed_epsilon([round_.dp_event], 1e-5)
    assert float(balance.reserved) == pytest.approx(held, abs=1e-11)
    assert float(balance.remaining) == pytest.approx(50 - held)


def test_launch_reserves_only_while_the_accountants_epsilon_fits_the_budget(alice, dpsgd_federation):
    one, two, three = (
        accountant.composed_epsilon([protocol.round_event("dpsgd", DPSGD)] * n, 1e-5) for n in (1, 2, 3)
    )
    # Room for two rounds by the accountant, though not for two by the plain sum, nor for three.
    assert two < 2 * one and two < three
    _member(dpsgd_federation, alice, "Hospital E", (two + min(three, 2 * one)) / 2)
    launched = [services.round_launch(federation=dpsgd_federation, launched_by=alice) for _ in range(2)]
    assert all(r.tasks.count() == 1 for r in launched)
    with pytest.raises(services.LaunchRefused, match="would take it to"):
        services.round_launch(federation=dpsgd_federation, launched_by=alice)
    assert Round.objects.filter(federation=dpsgd_federation).count() == 2


def test_a_dpsgd_round_needs_a_budget_with_a_delta(alice, dpsgd_federation, federation):
    _member(dpsgd_federation, alice, "Pure site", 100, budget_delta=0)
    with pytest.raises(services.LaunchRefused, match="delta 0, at which dpsgd has no finite epsilon"):
        services.round_launch(federation=dpsgd_federation, launched_by=alice)


def test_a_budget_cannot_be_lowered_below_what_is_reserved(alice, federation, sites):
    services.round_launch(federation=federation, launched_by=alice, site_ids=[sites["A"][0].pk])
    membership = Membership.objects.get(federation=federation, site=sites["A"][0])
    with pytest.raises(services.InvalidInput, match="already spent or reserved"):
        services.budget_set(membership=membership, budget=0.5, changed_by=alice, reason="cut")
    services.budget_set(membership=membership, budget=1, changed_by=alice, reason="cut to the reservation")


# --- the migration ------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_pure_epsilon_ledgers_migrate_to_pure_events_at_delta_zero():
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before, after = (
        [("coordinator", "0003_one_metric_value_per_step")],
        [("coordinator", "0004_dp_events_and_delta_budgets")],
    )
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    user = old.get_model("auth", "User").objects.create(username="old-coordinator")
    federation = old.get_model("coordinator", "Federation").objects.create(name="old study", created_by=user)
    version = old.get_model("coordinator", "ModelVersion").objects.create(
        federation=federation, number=0, path="x", sha256="0" * 64, size_bytes=1, n_parameters=1
    )
    site = old.get_model("coordinator", "Site").objects.create(name="old site", token_hash="1" * 64)
    membership = old.get_model("coordinator", "Membership").objects.create(
        federation=federation, site=site, budget_epsilon="3"
    )
    round_model, entry_model = (
        old.get_model("coordinator", "Round"),
        old.get_model("coordinator", "LedgerEntry"),
    )
    for number in (1, 2):
        round_ = round_model.objects.create(
            federation=federation, number=number, base_version=version, mechanism="svt",
            mechanism_params={}, epsilon_per_site="0.3", min_sites=1, deadline="2026-01-01T00:00Z",
        )  # fmt: skip
        for kind in ("reserve", "commit"):
            entry_model.objects.create(
                membership=membership, round=round_, kind=kind, epsilon="0.3", mechanism="svt"
            )

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(after)
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    migrated = Membership.objects.get(pk=membership.pk)
    assert migrated.budget_delta == 0 and migrated.federation.budget_delta == 0
    assert {tuple(sorted(e.dp_event.items())) for e in migrated.ledger.all()} == {
        (("epsilon", 0.3), ("kind", "pure"))
    }
    assert all(
        r.dp_event == {"kind": "pure", "epsilon": 0.3}
        for r in Round.objects.filter(federation_id=federation.pk)
    )
    balance = accounting.membership_balance(migrated)
    assert (balance.committed, balance.reserved, balance.remaining) == (
        accounting.as_decimal(0.6),
        0,
        3 - accounting.as_decimal(0.6),
    )


def test_the_papers_svt_setting_costs_about_4_2_million_a_round_on_the_brats_model():
    from coordinator import privacy_preview

    paper = privacy_preview.paper_svt_setting()
    assert paper["n_parameters"] > 4_500_000
    assert paper["epsilon"] == pytest.approx(4.2e6, rel=0.02)
    # Its release noise is 2 gamma: 2 c gamma / eps_release with eps_release = c.
    scales = protocol.svt_noise_scales(paper["params"], paper["n_parameters"])
    assert scales["release"] == pytest.approx(2 * paper["params"]["gamma"])
