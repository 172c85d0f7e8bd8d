"""The dashboard's pages over HTTP against the real database, as each of the cast sees them.

alice coordinates; bob administers site A; dave administers site B; charlie audits; eve has no role.
"""

from __future__ import annotations

import csv
import io
import json
import random
from decimal import Decimal

import pytest
from django.test import Client

from coordinator import accounting, services
from coordinator.models import (
    AuditEvent,
    LedgerEntry,
    LedgerKind,
    Membership,
    Round,
    RoundState,
    Site,
    Task,
    TaskState,
)
from sitesagent import protocol
from sitesagent.updates import encode_update

from .conftest import TINY_MODEL


def _browser(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def upload(task: Task, *, n_cases: int, n_iterations: int = 2, seed: int | None = None) -> None:
    """A valid update for the task's round at the first coordinates the round allows.

    Zero deltas, or with ``seed`` small random ones well inside the round's bounds.
    """
    round_ = task.round
    n = round_.base_version.n_parameters
    count = n
    indices = None
    if round_.mechanism != protocol.MECHANISM_NONE:
        count = protocol.selection_count(round_.mechanism_params["fraction"], n)
        indices = list(range(count))
    values = [0.0] * count
    if seed is not None:
        rng = random.Random(seed)
        scale = 0.5 * n_iterations * round_.mechanism_params.get("gamma", 1e-3)
        values = [rng.uniform(-scale, scale) for _ in range(count)]
    data = encode_update(
        indices=indices,
        values=values,
        n_parameters=n,
        n_iterations=n_iterations,
        n_cases=n_cases,
        mechanism=round_.mechanism,
        params=round_.mechanism_params,
    )
    services.update_accept(task=task, data=data)


def record(task: Task, **values: float) -> None:
    services.metrics_record(
        task=task,
        points=[{"name": name, "step": task.round.number, "value": v} for name, v in values.items()],
    )


def finish(round_: Round) -> Round:
    """Aggregate a round whose tasks all uploaded, as the worker would, in this process."""
    assert services.round_check_completion(round_id=round_.pk) == "aggregating"
    services.round_aggregate(round_id=round_.pk)
    return Round.objects.get(pk=round_.pk)


@pytest.fixture
def done_round(federation, sites, alice):
    """Round 1, done: A (10 cases) and B (30 cases) evaluated the base model and uploaded."""
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task_a = Task.objects.get(round=round_, site=sites["A"][0])
    task_b = Task.objects.get(round=round_, site=sites["B"][0])
    record(task_a, dice_et=0.2, dice_wt=0.6, dice_tc=0.4, dice_mean=0.4)
    record(task_b, dice_et=0.6, dice_wt=0.8, dice_tc=0.4, dice_mean=0.6)
    upload(task_a, n_cases=10)
    upload(task_b, n_cases=30)
    return finish(round_)


# --- Sign in and navigation ---------------------------------------------------------------------


def test_signed_out_people_are_sent_to_sign_in(federation):
    response = _browser().get(f"/federations/{federation.pk}/")
    assert response.status_code == 302 and response.url.startswith("/login/")


def test_sign_in_with_the_login_form(alice):
    client = Client()
    assert "Sign in" in client.get("/login/").content.decode()
    response = client.post("/login/", {"username": "alice", "password": "alice-password-123"})
    assert response.status_code == 302 and response.url == "/"
    assert "Sign out" in client.get("/").content.decode()


def test_home_lists_only_the_federations_a_person_is_part_of(federation, sites, alice, bob, eve):
    assert "BraTS study" in _browser(alice).get("/").content.decode()
    assert "BraTS study" in _browser(bob).get("/").content.decode()
    assert "BraTS study" not in _browser(eve).get("/").content.decode()


@pytest.mark.parametrize(
    ("who", "sees", "does_not_see"),
    [
        ("alice", ["Launch a round", "Audit log", "Privacy audit", "Budgets", ">Sites<"], []),
        ("charlie", ["Audit log", "Privacy audit", ">Sites<"], ["Launch a round"]),
        ("bob", ["Privacy audit", "Budgets", ">Sites<"], ["Launch a round", "Audit log"]),
    ],
)
def test_navigation_shows_each_role_only_what_it_may_use(request, federation, sites, who, sees, does_not_see):
    page = _browser(request.getfixturevalue(who)).get(f"/federations/{federation.pk}/").content.decode()
    for words in sees:
        assert words in page, words
    for words in does_not_see:
        assert words not in page, words


def test_people_without_a_role_get_not_found_everywhere(federation, sites, done_round, eve):
    client = _browser(eve)
    site_a = sites["A"][0]
    for path in [
        f"/federations/{federation.pk}/",
        f"/federations/{federation.pk}/budgets/",
        f"/federations/{federation.pk}/launch/",
        f"/federations/{federation.pk}/privacy/",
        f"/federations/{federation.pk}/privacy/ledger.csv",
        f"/federations/{federation.pk}/audit-log/",
        f"/rounds/{done_round.pk}/",
        f"/sites/{site_a.pk}/",
    ]:
        assert client.get(path).status_code == 404, path


# --- Federation overview ------------------------------------------------------------------------


def test_overview_charts_federated_dice_weighted_by_cases(alice, federation, done_round):
    response = _browser(alice).get(f"/federations/{federation.pk}/")
    assert response.status_code == 200
    dice = response.context["figures"]["dice"]
    by_name = {trace["name"]: trace for trace in dice["data"]}
    # A has 10 cases and 0.2, B has 30 cases and 0.6: (10 * 0.2 + 30 * 0.6) / 40 = 0.5.
    assert by_name["Enhancing tumour (ET)"]["x"] == [1]
    assert by_name["Enhancing tumour (ET)"]["y"] == [pytest.approx(0.5)]
    assert by_name["Mean"]["y"] == [pytest.approx((10 * 0.4 + 30 * 0.6) / 40)]
    heatmap = response.context["figures"]["heatmap"]["data"][0]
    assert heatmap["y"] == ["Hospital A", "Hospital B"] and heatmap["z"] == [[0.4], [0.6]]
    epsilon = {t["name"]: t["y"] for t in response.context["figures"]["epsilon"]["data"]}
    assert epsilon == {"Hospital A": [1.0], "Hospital B": [1.0]}
    page = response.content.decode()
    assert 'id="dice-figure"' in page and "js/plotly.min.js" in page
    assert "v1" in page  # the model version round 1 produced


def test_a_site_admin_sees_only_their_own_sites_dice(bob, federation, done_round):
    figures = _browser(bob).get(f"/federations/{federation.pk}/").context["figures"]
    assert figures["heatmap"]["data"][0]["y"] == ["Hospital A"]
    assert figures["dice"]["data"][0]["y"] == [pytest.approx(0.2)]
    assert [t["name"] for t in figures["epsilon"]["data"]] == ["Hospital A"]


def test_plotly_is_served_from_static_not_a_cdn(alice, federation):
    from django.contrib.staticfiles import finders

    assert finders.find("js/plotly.min.js")
    page = _browser(alice).get(f"/federations/{federation.pk}/").content.decode()
    assert "cdn" not in page.lower() and "https://" not in page


# --- Sites --------------------------------------------------------------------------------------


def test_registering_a_site_shows_its_token_once_with_the_agent_command(alice, federation):
    client = _browser(alice)
    response = client.post(
        "/sites/",
        {"name": "Hospital C", "federation": federation.pk, "budget": "3", "reason": "joins the study"},
    )
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    token = response.context["token"]
    page = response.content.decode()
    assert "shown once" in page
    assert f"python -m sitesagent run --server http://testserver --token {token} --data " in page
    site = Site.objects.get(name="Hospital C")
    assert services.site_authenticate(token) == site
    assert Membership.objects.get(site=site, federation=federation).budget_epsilon == Decimal(3)
    # Never again: the site's page and the list do not show it.
    assert token not in client.get(f"/sites/{site.pk}/").content.decode()
    assert token not in client.get("/sites/").content.decode()


def test_registering_a_site_twice_says_why(alice, sites):
    response = _browser(alice).post("/sites/", {"name": "Hospital A"})
    assert response.status_code == 200
    assert "already exists" in response.content.decode()


def test_only_people_who_may_register_sites_see_the_form_or_can_post_it(bob, sites):
    client = _browser(bob)
    assert "Register a site" not in client.get("/sites/").content.decode()
    assert client.post("/sites/", {"name": "Rogue"}).status_code == 403
    assert not Site.objects.filter(name="Rogue").exists()


def test_sites_list_shows_status_device_cases_and_data_check(alice, sites):
    site_a, site_b = sites["A"][0], sites["B"][0]
    check = {
        "n_cases": 41,
        "n_problems": 1,
        "ok": False,
        "shapes": [[240, 240, 155]],
        "orientations": ["RAS"],
    }
    services.site_heartbeat(site=site_a, info={"device": "cuda:0", "cases": 42, "data_check": check})
    page = _browser(alice).get("/sites/").content.decode()
    assert "online" in page and "GPU" in page and "42" in page
    assert "1 case(s) failed the check" in page and "data problems" in page
    assert "offline" in page  # Hospital B has never been seen
    detail = _browser(alice).get(f"/sites/{site_a.pk}/").content.decode()
    assert "240 × 240 × 155" in detail and "RAS" in detail
    services.site_heartbeat(
        site=site_b,
        info={"device": "cpu", "cases": 9, "data_check": {"ok": True, "n_cases": 9, "n_problems": 0}},
    )
    row = _browser(alice).get("/sites/").context["rows"][1]
    assert (row["device"], row["cases"], row["check"]["ok"], row["check"]["problems"]) == ("CPU", 9, True, [])


def test_rotating_a_token_shows_the_new_one_and_stops_the_old(bob, sites):
    site, old = sites["A"]
    response = _browser(bob).post(f"/sites/{site.pk}/rotate/")
    assert response.status_code == 200
    new = response.context["token"]
    assert services.site_authenticate(new) == site and services.site_authenticate(old) is None


def test_revoking_a_token_is_audited(bob, sites):
    site, token = sites["A"]
    _browser(bob).post(f"/sites/{site.pk}/revoke/", {"reason": "laptop stolen"})
    assert services.site_authenticate(token) is None
    assert AuditEvent.objects.filter(action="site.token_revoked", site=site, reason="laptop stolen").exists()


def test_a_site_admin_rotates_only_their_own_sites_token(alice, bob, sites):
    client = _browser(bob)
    own, other = sites["A"][0], sites["B"][0]
    assert client.get(f"/sites/{own.pk}/").status_code == 200
    assert client.get(f"/sites/{other.pk}/").status_code == 404
    assert client.post(f"/sites/{other.pk}/rotate/").status_code == 404
    assert client.post(f"/sites/{own.pk}/rotate/").status_code == 200
    assert _browser(alice).post(f"/sites/{own.pk}/rotate/").status_code == 403  # its coordinator
    assert "Hospital B" not in client.get("/sites/").content.decode()


def test_adding_an_existing_site_to_a_federation_invites_it(alice, federation):
    site, _ = services.site_register(name="Hospital C", registered_by=alice)
    _browser(alice).post(
        f"/sites/{site.pk}/join/", {"federation": federation.pk, "budget": "1.5", "reason": "joins"}
    )
    membership = Membership.objects.get(site=site)
    assert (membership.budget_epsilon, membership.status) == (Decimal("1.5"), "invited")


# --- Budgets ------------------------------------------------------------------------------------


def _membership(site) -> Membership:
    return Membership.objects.get(site=site)


def test_budgets_page_shows_committed_reserved_and_remaining(alice, federation, sites, done_round):
    services.round_launch(federation=federation, launched_by=alice)  # reserves 1 more each
    response = _browser(alice).get(f"/federations/{federation.pk}/budgets/")
    rows = {row["site"]: row for row in response.context["rows"]}
    a = rows["Hospital A"]
    assert (a["budget"], a["committed"], a["reserved"], a["remaining"]) == (2, 1, 1, 0)
    bars = {trace["name"]: trace["x"] for trace in response.context["figure"]["data"]}
    assert bars == {"committed": [1.0, 1.0], "reserved": [1.0, 1.0], "remaining": [0.0, 0.0]}


def test_a_coordinator_changes_a_budget_with_a_reason(alice, federation, sites):
    membership = _membership(sites["A"][0])
    response = _browser(alice).post(
        f"/federations/{federation.pk}/budgets/",
        {"membership": membership.pk, "budget": "5", "reason": "ethics board approved"},
        follow=True,
    )
    assert "budget is now ε 5" in response.content.decode()
    assert _membership(sites["A"][0]).budget_epsilon == 5
    event = AuditEvent.objects.get(action="budget.changed")
    assert event.reason == "ethics board approved" and event.actor == alice


def test_a_site_admin_may_lower_their_budget_but_never_raise_it(bob, federation, sites):
    client = _browser(bob)
    membership = _membership(sites["A"][0])
    url = f"/federations/{federation.pk}/budgets/"
    response = client.post(url, {"membership": membership.pk, "budget": "9", "reason": "more"}, follow=True)
    assert "never raise it" in response.content.decode()
    assert _membership(sites["A"][0]).budget_epsilon == 2
    client.post(url, {"membership": membership.pk, "budget": "1.5", "reason": "our board says so"})
    assert _membership(sites["A"][0]).budget_epsilon == Decimal("1.5")
    other = _membership(sites["B"][0])
    assert client.post(url, {"membership": other.pk, "budget": "1", "reason": "x"}).status_code == 404
    assert _membership(sites["B"][0]).budget_epsilon == 2


def test_an_auditor_reads_budgets_but_is_offered_no_change(charlie, bob, federation, sites):
    page = _browser(charlie).get(f"/federations/{federation.pk}/budgets/").content.decode()
    assert "Hospital A" in page and "Hospital B" in page
    assert 'name="reason"' not in page and "read only" in page
    own = _browser(bob).get(f"/federations/{federation.pk}/budgets/").content.decode()
    assert 'name="reason"' in own and 'max="2"' in own  # a site admin may only lower it


def test_the_sites_page_names_only_federations_the_person_may_see(alice, eve, sites):
    hidden = services.federation_create(name="Other study", created_by=eve, model_config=TINY_MODEL)
    services.membership_add(federation=hidden, site=sites["A"][0], budget=1, added_by=eve, reason="joins")
    page = _browser(alice).get("/sites/").content.decode()
    assert "Hospital A" in page and "Other study" not in page


def test_a_budget_below_what_was_spent_is_refused_with_the_reason(alice, federation, sites, done_round):
    membership = _membership(sites["A"][0])
    response = _browser(alice).post(
        f"/federations/{federation.pk}/budgets/",
        {"membership": membership.pk, "budget": "0.5", "reason": "cut"},
        follow=True,
    )
    assert "already spent" in response.content.decode()
    assert _membership(sites["A"][0]).budget_epsilon == 2


# --- Launch -------------------------------------------------------------------------------------


def _launch_data(sites, **overrides):
    data = {
        "sites": [str(sites["A"][0].pk), str(sites["B"][0].pk)],
        "mechanism": "svt",
        "fraction": "0.1",
        "gamma": "0.01",
        "tau": "0.001",
        "eps_threshold": "0.1",
        "eps_query": "0.4",
        "eps_release": "0.5",
        "local_epochs": "0",
        "max_iterations": "2",
        "deadline_minutes": "30",
        "min_sites": "1",
        "rounds": "1",
        "confirm_noise": "on",  # the suite's SVT parameters are mostly noise
    }
    return {**data, **overrides}


def test_launch_page_renders_a_first_preview(alice, federation, sites):
    response = _browser(alice).get(f"/federations/{federation.pk}/launch/")
    assert response.status_code == 200
    preview = response.context["preview"]
    assert preview["epsilon"] == pytest.approx(1.0)
    assert {s["name"] for s in preview["sites"]} == {"Hospital A", "Hospital B"}


def test_preview_shows_cost_balance_noise_and_warnings_per_site(alice, federation, sites):
    client = _browser(alice)
    url = f"/federations/{federation.pk}/launch/preview/"
    response = client.post(url, _launch_data(sites, eps_release="1.9"))
    page = response.content.decode()
    preview = response.context["preview"]
    assert preview["epsilon"] == pytest.approx(2.4)
    a = next(s for s in preview["sites"] if s["name"] == "Hospital A")
    assert Decimal(a["remaining_after"]) == Decimal("-0.4") and a["rounds_left"] == 0
    assert (
        "has 2 epsilon left of 2" in page and "would take it to 2.4" in page and "cosine similarity" in page
    )
    assert preview["mostly_noise"] and "mostly noise" in page
    paper = preview["paper_svt"]
    c = protocol.selection_count(0.9, preview["n_parameters"])
    assert paper["epsilon"] == pytest.approx(0.001 + c) and "data-paper-svt" in page
    assert "each released value" in page and "Scale / γ" in page
    weak = client.post(url, _launch_data(sites, eps_release="20")).content.decode()
    assert "A guarantee so weak it means little" in weak


def test_preview_of_partial_sharing_says_there_is_no_formal_guarantee(alice, federation, sites):
    response = _browser(alice).post(
        f"/federations/{federation.pk}/launch/preview/", _launch_data(sites, mechanism="partial")
    )
    page = response.content.decode()
    assert "no formal guarantee" in page.lower()
    assert "does not allow unprotected sharing" in page


def test_preview_explains_bad_parameters(alice, federation, sites):
    response = _browser(alice).post(
        f"/federations/{federation.pk}/launch/preview/", _launch_data(sites, gamma="")
    )
    assert "svt needs gamma" in response.content.decode()


def test_launch_creates_the_round_and_opens_its_page(alice, federation, sites):
    response = _browser(alice).post(
        f"/federations/{federation.pk}/launch/", _launch_data(sites, action="launch"), follow=True
    )
    round_ = Round.objects.get()
    assert response.redirect_chain[-1][0] == f"/rounds/{round_.pk}/"
    assert round_.epsilon_per_site == Decimal(1) and round_.training_params["max_iterations"] == 2
    assert round_.deadline > round_.launched_at
    assert "Round 1 launched with 2 site(s)" in response.content.decode()


def test_a_refused_launch_shows_why_and_writes_nothing(alice, federation, sites):
    response = _browser(alice).post(
        f"/federations/{federation.pk}/launch/", _launch_data(sites, eps_release="5", action="launch")
    )
    page = response.content.decode()
    assert response.status_code == 200
    assert "only 0 of the asked sites can take part" in page and "Hospital A has 2 epsilon left" in page
    assert not Round.objects.exists() and not LedgerEntry.objects.exists()


def test_launching_rounds_back_to_back(alice, federation, sites):
    _browser(alice).post(
        f"/federations/{federation.pk}/launch/", _launch_data(sites, rounds="3", action="launch")
    )
    federation.refresh_from_db()
    assert Round.objects.count() == 1 and federation.auto_rounds_remaining == 2


def test_only_coordinators_may_launch(bob, charlie, federation, sites):
    for person in (bob, charlie):
        client = _browser(person)
        assert client.get(f"/federations/{federation.pk}/launch/").status_code == 403
        data = _launch_data(sites, action="launch")
        assert client.post(f"/federations/{federation.pk}/launch/", data).status_code == 403
        assert client.post(f"/federations/{federation.pk}/launch/preview/", data).status_code == 403
    assert not Round.objects.exists()


# --- Live round ---------------------------------------------------------------------------------


def test_round_page_embeds_what_is_known_so_far(alice, federation, sites):
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task_a = Task.objects.get(round=round_, site=sites["A"][0])
    task_b = Task.objects.get(round=round_, site=sites["B"][0])
    services.task_report(task=task_a, state=TaskState.TRAINING, progress=0.5)
    services.metrics_record(
        task=task_a,
        points=[
            {"name": "train_loss", "step": 1, "value": 0.9},
            {"name": "train_loss", "step": 2, "value": 0.7},
            {"name": "throughput", "step": 2, "value": 3.5},
        ],
    )
    services.task_report(task=task_b, state=TaskState.DROPPED, reason="out of GPU memory")
    response = _browser(alice).get(f"/rounds/{round_.pk}/")
    loss = response.context["figures"]["loss"]["data"]
    assert [(t["name"], t["meta"]["site"], t["x"], t["y"]) for t in loss] == [
        ("Hospital A", task_a.site_id, [1, 2], [0.9, 0.7]),
        ("Hospital B", task_b.site_id, [], []),
    ]
    page = response.content.decode()
    assert "out of GPU memory" in page and "0.7000" in page and 'data-bar-width="50"' in page
    assert f'data-watch-round="{round_.pk}"' in page


def test_round_page_shows_rejections_and_failures(alice, federation, sites):
    round_ = services.round_launch(federation=federation, launched_by=alice)
    services.round_abort(round_=round_, aborted_by=alice, reason="wrong data split")
    page = _browser(alice).get(f"/rounds/{round_.pk}/").content.decode()
    assert "wrong data split" in page and "aborted" in page


def test_round_page_shows_a_site_admin_only_their_task(bob, alice, federation, sites):
    services.budget_set(membership=_membership(sites["B"][0]), budget=0.5, changed_by=alice, reason="cut")
    services.budget_set(membership=_membership(sites["A"][0]), budget=1.5, changed_by=alice, reason="cut")
    round_ = services.round_launch(federation=federation, launched_by=alice)
    response = _browser(bob).get(f"/rounds/{round_.pk}/")
    assert [row["task"].site.name for row in response.context["rows"]] == ["Hospital A"]
    assert response.context["excluded"] == []  # B's reason names B's balance: not bob's business
    assert "Hospital B" not in response.content.decode()
    assert "0.5 epsilon left" in _browser(alice).get(f"/rounds/{round_.pk}/").content.decode()


def test_a_coordinator_aborts_a_round_with_a_reason(alice, bob, federation, sites):
    round_ = services.round_launch(federation=federation, launched_by=alice)
    assert _browser(bob).post(f"/rounds/{round_.pk}/abort/", {"reason": "no"}).status_code == 403
    _browser(alice).post(f"/rounds/{round_.pk}/abort/", {"reason": "bad config"})
    assert Round.objects.get(pk=round_.pk).state == RoundState.ABORTED


def test_evaluation_table_weighs_sites_by_cases(alice, federation, done_round):
    response = _browser(alice).get(f"/rounds/{done_round.pk}/")
    assert response.context["federated"]["dice_et"] == pytest.approx(0.5)
    assert "0.500" in response.content.decode()


# --- Privacy audit ------------------------------------------------------------------------------


@pytest.fixture
def ledger(federation, sites, alice, done_round):
    """Round 1 done (two commits), round 2 aborted (two releases), round 3 unprotected and done at A."""
    round_2 = services.round_launch(federation=federation, launched_by=alice)
    services.round_abort(round_=round_2, aborted_by=alice, reason="wrong split")
    services.budget_set(
        membership=_membership(sites["A"][0]),
        budget=2,
        changed_by=alice,
        reason="consent",
        allows_unprotected_sharing=True,
    )
    round_3 = services.round_launch(
        federation=federation,
        launched_by=alice,
        mechanism="partial",
        mechanism_params={"fraction": 0.1, "gamma": 0.1},
    )
    upload(Task.objects.get(round=round_3), n_cases=10)
    finish(round_3)
    return LedgerEntry.objects.order_by("id")


def test_privacy_page_lists_every_entry_with_its_balance(alice, federation, ledger):
    response = _browser(alice).get(f"/federations/{federation.pk}/privacy/")
    rows = response.context["rows"]
    assert [row["entry"].pk for row in rows] == [e.pk for e in ledger]
    page = response.content.decode()
    assert "no formal guarantee" in page and "fraction=0.1" in page and "eps_release=0.5" in page
    assert "Not protected by the mechanism" in page and "case" in page and "which sites took part" in page
    last_a = [row for row in rows if row["entry"].membership.site.name == "Hospital A"][-1]
    assert last_a["balance"].committed == 1 and last_a["balance"].unprotected_rounds == 1


def test_privacy_filters_pick_rows_without_changing_balances(alice, federation, sites, ledger):
    client = _browser(alice)
    everything = client.get(f"/federations/{federation.pk}/privacy/").context["rows"]
    after = {row["entry"].pk: row["balance"] for row in everything}
    site_b = sites["B"][0]
    rows = client.get(f"/federations/{federation.pk}/privacy/?site={site_b.pk}&kind=release").context["rows"]
    assert [r["entry"].kind for r in rows] == ["release"] and rows[0]["entry"].membership.site == site_b
    assert rows[0]["balance"] == after[rows[0]["entry"].pk]
    assert {
        r["entry"].round.number
        for r in client.get(f"/federations/{federation.pk}/privacy/?round=3").context["rows"]
    } == {3}


def _expected_export(federation):
    memberships = list(federation.memberships.all())
    entries = LedgerEntry.objects.filter(membership__in=memberships).order_by("id")
    return accounting.ledger_with_balances(entries, memberships)


def test_json_export_matches_the_ledger_exactly(alice, federation, ledger):
    response = _browser(alice).get(f"/federations/{federation.pk}/privacy/ledger.json")
    assert response["Content-Disposition"].startswith("attachment")
    exported = response.json()
    expected = _expected_export(federation)
    assert len(exported) == len(expected) == LedgerEntry.objects.count()
    for row, want in zip(exported, expected, strict=True):
        entry, balance = want["entry"], want["balance"]
        assert row["id"] == entry.pk and row["kind"] == entry.kind and row["round"] == entry.round.number
        assert row["site"] == entry.membership.site.name and row["mechanism"] == entry.mechanism
        assert row["mechanism_params"] == entry.mechanism_params
        assert (None if row["epsilon"] is None else Decimal(row["epsilon"])) == entry.epsilon
        assert row["guarantee"].startswith("no formal guarantee" if entry.epsilon is None else "local DP")
        assert row["dp_event"] == entry.dp_event and row["delta"] == 0
        assert row["launched_by"] == "alice" and row["created_at"] == entry.created_at.isoformat()
        assert Decimal(row["remaining_after"]) == balance.remaining
        assert Decimal(row["committed_after"]) == balance.committed
        assert Decimal(row["reserved_after"]) == balance.reserved
    assert any(row["epsilon"] is None for row in exported)


def test_csv_export_matches_the_ledger_exactly(alice, federation, ledger):
    response = _browser(alice).get(f"/federations/{federation.pk}/privacy/ledger.csv")
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    json_rows = _browser(alice).get(f"/federations/{federation.pk}/privacy/ledger.json").json()
    assert len(rows) == len(json_rows) == LedgerEntry.objects.count()
    for row, entry in zip(rows, LedgerEntry.objects.order_by("id"), strict=True):
        assert int(row["id"]) == entry.pk and row["kind"] == entry.kind
        assert row["epsilon"] == ("" if entry.epsilon is None else str(entry.epsilon))
        assert json.loads(row["mechanism_params"]) == entry.mechanism_params
    for row, json_row in zip(rows, json_rows, strict=True):
        assert row["remaining_after"] == json_row["remaining_after"]


def test_exports_follow_the_filters(alice, federation, sites, ledger):
    site_a = sites["A"][0]
    rows = _browser(alice).get(f"/federations/{federation.pk}/privacy/ledger.json?site={site_a.pk}").json()
    assert rows and {row["site"] for row in rows} == {"Hospital A"}
    assert len(rows) == LedgerEntry.objects.filter(membership__site=site_a).count()


def test_a_site_admin_audits_only_their_own_sites_ledger(bob, federation, sites, ledger):
    client = _browser(bob)
    rows = client.get(f"/federations/{federation.pk}/privacy/").context["rows"]
    assert rows and {row["entry"].membership.site.name for row in rows} == {"Hospital A"}
    exported = client.get(f"/federations/{federation.pk}/privacy/ledger.csv").content.decode()
    assert "Hospital A" in exported and "Hospital B" not in exported
    assert client.get(f"/federations/{federation.pk}/privacy/ledger.xml").status_code == 404


def test_privacy_page_names_the_accountant_and_lists_each_sites_events(alice, federation, ledger):
    response = _browser(alice).get(f"/federations/{federation.pk}/privacy/")
    bounds = {row["site"]: row for row in response.context["bounds"]}
    a = bounds["Hospital A"]
    # The fixture's federation states budgets at delta 0: one pure round of 1 composes to exactly 1.
    assert a["committed"] == 1 and a["figures"].rounds == 1 and a["figures"].unprotected_rounds == 1
    assert a["events"] == [{"kind": "pure", "epsilon": 1.0}]
    page = response.content.decode()
    assert "dp-accounting 0.6.0" in page and "privacy loss distributions" in page
    assert "patient-level" in page and "local DP of each site" in page


# --- Composition figures ------------------------------------------------------------------------


def test_composition_figures_count_unprotected_rounds_apart():
    figures = accounting.composition_figures([None, None], 1e-5)
    assert (figures.rounds, figures.unprotected_rounds, figures.accountant_epsilon) == (0, 2, 0)
    assert not figures.has_formal_guarantee
    figures = accounting.composition_figures(
        [{"kind": "pure", "epsilon": 1.0}, {"kind": "pure", "epsilon": 0.5}], 0
    )
    assert figures.accountant_epsilon == 1.5 and figures.plain_sum == 1.5 and figures.has_formal_guarantee


# --- Audit log ----------------------------------------------------------------------------------


def test_audit_log_lists_every_action_for_coordinators_and_auditors(
    alice, charlie, federation, sites, done_round
):
    site = sites["A"][0]
    services.site_token_rotate(site=site, rotated_by=site.admins.get())
    for person in (alice, charlie):
        response = _browser(person).get(f"/federations/{federation.pk}/audit-log/")
        actions = {event.action for event in response.context["page"]}
        expected = {"federation.created", "membership.invited", "membership.accepted", "round.launched"}
        assert expected | {"site.token_rotated"} <= actions
    filtered = _browser(alice).get(f"/federations/{federation.pk}/audit-log/?action=round.launched")
    assert {e.action for e in filtered.context["page"]} == {"round.launched"}


def test_site_admins_may_not_read_the_audit_log(bob, federation, sites):
    assert _browser(bob).get(f"/federations/{federation.pk}/audit-log/").status_code == 403


def test_ledger_kinds_in_fixture_cover_reserve_commit_release(ledger):
    assert {e.kind for e in ledger} == {LedgerKind.RESERVE, LedgerKind.COMMIT, LedgerKind.RELEASE}
