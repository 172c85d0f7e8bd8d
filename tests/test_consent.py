"""Sites in control of where they take part: joining a federation is an invitation the site's
admins accept (through the API or the dashboard); until then the site gets no task and nothing is
reserved for it; a site may leave, which releases its open reservations and keeps its ledger.
Every step is audited. Through real HTTP (the test client against the real database), and once
with a real agent process under daphne."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client

from coordinator import services
from coordinator.models import AuditEvent, LedgerEntry, Membership, Task
from sitesagent.synth import write_synthetic_cases

from .conftest import SVT_PARAMS, TINY_MODEL, join, make_user


def _browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def invited(federation, alice, client_for):
    """Hospital D, registered by alice, invited into the study, then given its admin ivy:
    (site, token, membership id, ivy)."""
    created = client_for(alice).post("/api/sites/", {"name": "Hospital D"}, format="json").json()
    site_id, token = created["site"]["id"], created["token"]
    answer = client_for(alice).post(
        f"/api/federations/{federation.pk}/memberships/",
        {"site": site_id, "budget": 3, "reason": "please join the study"},
        format="json",
    )
    assert answer.status_code == 201 and answer.json()["status"] == "invited"
    ivy = make_user("ivy")
    site = Membership.objects.get(pk=answer.json()["id"]).site
    services.site_admin_add(site=site, user=ivy, added_by=alice)
    return site, token, answer.json()["id"], ivy


def test_an_invited_site_gets_no_task_and_nothing_reserved_until_its_admin_accepts(
    client_for, alice, federation, sites, invited
):
    site, token, membership_id, ivy = invited
    coordinator = client_for(alice)
    first = coordinator.post(
        f"/api/federations/{federation.pk}/rounds/", {"confirm_noise": True}, format="json"
    ).json()
    assert {e["name"]: e["reason"] for e in first["excluded_sites"]} == {
        "Hospital D": "Hospital D has not accepted the invitation to this federation"
    }
    assert not Task.objects.filter(site=site).exists()
    assert not LedgerEntry.objects.filter(membership__site=site).exists()
    assert client_for(token=token).get("/api/agent/task/").status_code == 204

    accepted = client_for(ivy).post(f"/api/memberships/{membership_id}/accept/")
    assert accepted.status_code == 200 and accepted.json()["status"] == "accepted"
    second = coordinator.post(
        f"/api/federations/{federation.pk}/rounds/", {"confirm_noise": True}, format="json"
    ).json()
    assert second["excluded_sites"] == []
    task = client_for(token=token).get("/api/agent/task/").json()
    assert task["round"] == second["id"]
    assert LedgerEntry.objects.filter(membership__site=site, kind="reserve").count() == 1


def test_the_launch_preview_leaves_an_invited_site_out_with_the_reason(
    client_for, alice, federation, sites, invited
):
    preview = client_for(alice).post(f"/api/federations/{federation.pk}/rounds/preview/", {}, format="json")
    rows = {row["name"]: row for row in preview.json()["sites"]}
    assert rows["Hospital D"]["left_out"] == "Hospital D has not accepted the invitation to this federation"
    assert rows["Hospital D"]["remaining_after"] is None and "left_out" not in rows["Hospital A"]
    page = _browser(alice).get(f"/federations/{federation.pk}/launch/").content.decode()
    assert "Hospital D has not accepted the invitation to this federation: it will be left out." in page


def test_a_site_admin_accepts_an_invitation_in_the_dashboard(alice, federation, invited):
    site, _, membership_id, ivy = invited
    browser = _browser(ivy)
    page = browser.get(f"/sites/{site.pk}/").content.decode()
    assert 'data-status="invited"' in page and f"/memberships/{membership_id}/accept/" in page
    assert browser.post(f"/memberships/{membership_id}/accept/").status_code == 302
    assert Membership.objects.get(pk=membership_id).accepted_by == ivy
    # The coordinator may invite, never accept for the site.
    assert _browser(alice).post(f"/memberships/{membership_id}/accept/").status_code == 403


def test_leaving_releases_open_reservations_drops_the_task_and_keeps_the_ledger(
    client_for, alice, bob, federation, sites
):
    site_a, token_a = sites["A"]
    round_ = services.round_launch(federation=federation, launched_by=alice)
    membership = site_a.memberships.get()
    left = client_for(bob).post(
        f"/api/memberships/{membership.pk}/leave/", {"reason": "study closed"}, format="json"
    )
    assert left.status_code == 200 and left.json()["status"] == "left"
    task = Task.objects.get(round=round_, site=site_a)
    assert (task.state, task.reason) == ("dropped", "the site left the federation")
    kinds = list(LedgerEntry.objects.filter(membership=membership).values_list("kind", flat=True))
    assert kinds == ["reserve", "release"]
    assert client_for(token=token_a).get("/api/agent/task/").status_code == 204
    ledger = client_for(alice).get(f"/api/federations/{federation.pk}/ledger/").json()
    assert [row["kind"] for row in ledger if row["site_name"] == "Hospital A"] == ["reserve", "release"]
    again = services.round_launch(
        federation=federation, launched_by=alice, site_ids=[site_a.pk, sites["B"][0].pk]
    )
    assert [e["reason"] for e in again.excluded_sites] == ["Hospital A left this federation"]


def test_a_site_admin_leaves_in_the_dashboard(alice, bob, federation, sites):
    membership = sites["A"][0].memberships.get()
    assert _browser(bob).post(f"/memberships/{membership.pk}/leave/", {"reason": "done"}).status_code == 302
    assert Membership.objects.get(pk=membership.pk).left_at is not None
    assert _browser(alice).get(f"/sites/{sites['A'][0].pk}/").status_code == 404  # seen only as a member


def test_every_step_is_audited_with_who_did_it(client_for, alice, federation, invited):
    site, _, membership_id, ivy = invited
    client_for(ivy).post(f"/api/memberships/{membership_id}/accept/")
    client_for(ivy).post(f"/api/memberships/{membership_id}/leave/", {"reason": "withdrawn"}, format="json")
    steps = [
        (e.action, e.actor.username, e.reason)
        for e in AuditEvent.objects.filter(site=site, action__startswith="membership.").order_by("id")
    ]
    assert steps == [
        ("membership.invited", "alice", "please join the study"),
        ("membership.accepted", "ivy", ""),
        ("membership.left", "ivy", "withdrawn"),
    ]


@pytest.mark.django_db(transaction=True)
def test_memberships_made_before_consent_become_accepted_when_migrated(alice):
    executor = MigrationExecutor(connection)
    executor.migrate([("coordinator", "0003_one_metric_value_per_step")])
    old = executor.loader.project_state([("coordinator", "0003_one_metric_value_per_step")]).apps
    federation = old.get_model("coordinator", "Federation").objects.create(name="Old study")
    site = old.get_model("coordinator", "Site").objects.create(name="Old hospital", token_hash="0" * 64)
    made = old.get_model("coordinator", "Membership").objects.create(
        federation=federation, site=site, budget_epsilon=1
    )
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    membership = Membership.objects.get(pk=made.pk)
    assert membership.status == "accepted" and membership.accepted_at == made.created_at
    assert membership.accepted_by is None


# --- The real agent -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_an_agent_trains_only_for_the_federation_its_site_accepted(tmp_path, alice, federation, sites):
    """Site A accepted the study and is only invited to a second study; both launch a round (the
    second one first, so it would be the agent's oldest task). The real agent process trains for
    the study and for nothing else."""
    from .servers import Agent, AsgiServer

    site_a, token_a = sites["A"]
    second = services.federation_create(
        name="Second study",
        created_by=alice,
        model_config=TINY_MODEL,
        default_mechanism="svt",
        default_mechanism_params=SVT_PARAMS,
        budget_delta=0,
        training_defaults={"local_epochs": 0, "max_iterations": 1, "roi_size": 16},
    )
    services.membership_add(federation=second, site=site_a, budget=5, added_by=alice, reason="invited")
    join(second, sites["B"][0], budget=5, added_by=alice, accepted_by=sites["B"][0].admins.get())
    second_round = services.round_launch(federation=second, launched_by=alice)
    study_round = services.round_launch(
        federation=federation, launched_by=alice, site_ids=[site_a.pk], training_params={"max_iterations": 1}
    )
    data = tmp_path / "site-a"
    write_synthetic_cases(data, 2, seed=3, style=0, size=32)
    server = AsgiServer(tmp_path / "daphne.log", settings.STORAGE_DIR)
    try:
        agent = Agent(tmp_path / "agent.log", server.url, token_a, data, once=True)
        agent.process.wait(timeout=240)
        assert agent.process.returncode == 0, agent.output()[-3000:]
    finally:
        server.stop()
    assert Task.objects.get(round=study_round, site=site_a).state == "uploaded"
    assert not Task.objects.filter(round=second_round, site=site_a).exists()
    assert not LedgerEntry.objects.filter(round=second_round, membership__site=site_a).exists()
    assert [e["name"] for e in second_round.excluded_sites] == ["Hospital A"]
