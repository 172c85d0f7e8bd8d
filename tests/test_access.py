"""Who may do what: a table of role x endpoint x object, each cell a test.

Roles: alice coordinates the study; bob and dave administer its sites A and B; charlie audits it;
eve has no role; frank coordinates another study (with his site C, which hank administers);
gina is staff with a federation of her own; ivy administers site D, which alice invited into the
study and which has not accepted; "anon" is signed out; "agent A", "agent B" and "agent D" hold
the sites' tokens.
"""

import pytest
from django.test import Client

from coordinator import services
from coordinator.models import AuditEvent, LedgerEntry, Membership, MetricPoint, Task, Update

from .conftest import SVT_PARAMS, TINY_MODEL, join, make_user

ROLES = [
    "alice",
    "bob",
    "dave",
    "charlie",
    "eve",
    "frank",
    "gina",
    "hank",
    "ivy",
    "anon",
    "agent A",
    "agent B",
    "agent D",
]
# Roles that may see nothing of the study's sites A and B.
STRANGERS = {"eve": 404, "frank": 404, "gina": 404, "hank": 404, "ivy": 404}


def _federation(name, coordinator):
    return services.federation_create(
        name=name,
        created_by=coordinator,
        model_config=TINY_MODEL,
        default_mechanism="svt",
        default_mechanism_params=SVT_PARAMS,
        budget_delta=0,
    )


@pytest.fixture
def world(federation, sites, alice, bob, dave, charlie, eve):
    frank, hank, ivy = make_user("frank"), make_user("hank"), make_user("ivy")
    gina = make_user("gina", is_staff=True)
    other = _federation("Another study", frank)
    site_c, _ = services.site_register(name="Hospital C", registered_by=frank)
    services.site_admin_add(site=site_c, user=hank, added_by=frank)
    join(other, site_c, budget=2, added_by=frank, accepted_by=hank)
    own = _federation("Gina's study", gina)
    site_d, token_d = services.site_register(name="Hospital D", registered_by=alice)
    services.site_admin_add(site=site_d, user=ivy, added_by=alice)
    membership_d = services.membership_add(
        federation=federation, site=site_d, budget=2, added_by=alice, reason="invited"
    )
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task_a = Task.objects.get(round=round_, site=sites["A"][0])
    membership_a = sites["A"][0].memberships.get()
    users = {"alice": alice, "bob": bob, "dave": dave, "charlie": charlie, "eve": eve}
    users |= {"frank": frank, "gina": gina, "hank": hank, "ivy": ivy}
    return {
        "users": users,
        "tokens": {"agent A": sites["A"][1], "agent B": sites["B"][1], "agent D": token_d},
        # The federation a role would add a site to: its own where it has one.
        "own_federation": {"frank": other.pk, "hank": other.pk, "gina": own.pk},
        "ids": {
            "fed": federation.pk,
            "other_fed": other.pk,
            "gina_fed": own.pk,
            "round": round_.pk,
            "task_a": task_a.pk,
            "site_a": sites["A"][0].pk,
            "site_d": site_d.pk,
            "mem_a": membership_a.pk,
            "mem_d": membership_d.pk,
            "version": federation.latest_version().pk,
        },
    }


def _client(world, role, client_for):
    if role in world["users"]:
        return client_for(world["users"][role])
    if role in world["tokens"]:
        return client_for(token=world["tokens"][role])
    return client_for()


def _ids(world, role):
    return {**world["ids"], "own_fed": world["own_federation"].get(role, world["ids"]["fed"])}


# (name, method, path, body, expected status per role; roles not named expect the "else" entry)
TABLE = [
    (
        "federation",
        "get",
        "/api/federations/{fed}/",
        None,
        {"alice": 200, "bob": 200, "dave": 200, "charlie": 200, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "membership A",
        "get",
        "/api/memberships/{mem_a}/",
        None,
        {"alice": 200, "bob": 200, "charlie": 200, "dave": 404, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "ledger of site A",
        "get",
        "/api/memberships/{mem_a}/ledger/",
        None,
        {"alice": 200, "bob": 200, "charlie": 200, "dave": 404, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "raise A's budget",
        "patch",
        "/api/memberships/{mem_a}/",
        {"budget": 9, "reason": "r"},
        {"alice": 200, "bob": 403, "charlie": 403, "dave": 404, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "lower A's budget",
        "patch",
        "/api/memberships/{mem_a}/",
        {"budget": 1.5, "reason": "r"},
        {"alice": 200, "bob": 200, "charlie": 403, "dave": 404, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "launch a round",
        "post",
        "/api/federations/{fed}/rounds/",
        {"confirm_noise": True},
        {"alice": 201, "bob": 403, "dave": 403, "charlie": 403, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "abort a round",
        "post",
        "/api/rounds/{round}/abort/",
        {"reason": "r"},
        {"alice": 200, "bob": 403, "dave": 403, "charlie": 403, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "audit log",
        "get",
        "/api/federations/{fed}/audit/",
        None,
        {"alice": 200, "charlie": 200, "bob": 403, "dave": 403, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "site A",
        "get",
        "/api/sites/{site_a}/",
        None,
        {"alice": 200, "bob": 200, "charlie": 200, "dave": 404, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        # Only the site's own admins: its federation's coordinator (and registrant) no longer may.
        "rotate A's token",
        "post",
        "/api/sites/{site_a}/rotate-token/",
        None,
        {"bob": 200, "alice": 403, "charlie": 403, "dave": 404, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "revoke A's token",
        "post",
        "/api/sites/{site_a}/revoke/",
        {"reason": "r"},
        {"bob": 200, "alice": 403, "charlie": 403, "dave": 404, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        # The hijack: add the study's site A to a federation of one's own.
        "add site A to one's own federation",
        "post",
        "/api/federations/{own_fed}/memberships/",
        {"site": "{site_a}", "budget": 1, "reason": "r"},
        {
            "alice": 409,  # A is already in her study
            "bob": 403,
            "dave": 403,
            "charlie": 403,
            **STRANGERS,
            "hank": 403,  # he sees frank's federation through his site, and may not add to it
            "anon": 401,
            "else": 403,
        },
    ),
    (
        "site D (invited, not accepted)",
        "get",
        "/api/sites/{site_d}/",
        None,
        {"ivy": 200, "anon": 401, **{r: 403 for r in ("agent A", "agent B", "agent D")}, "else": 404},
    ),
    (
        "accept D's invitation",
        "post",
        "/api/memberships/{mem_d}/accept/",
        None,
        {
            "ivy": 200,
            "alice": 403,
            "charlie": 403,
            "anon": 401,
            "agent A": 403,
            "agent B": 403,
            "agent D": 403,
            "else": 404,
        },
    ),
    (
        "A leaves the study",
        "post",
        "/api/memberships/{mem_a}/leave/",
        {"reason": "r"},
        {"bob": 200, "alice": 403, "charlie": 403, "dave": 404, **STRANGERS, "anon": 401, "else": 403},
    ),
    (
        "register a site",
        "post",
        "/api/sites/",
        {"name": "Hospital New"},
        {"alice": 201, "frank": 201, "gina": 201, "anon": 401, "else": 403},
    ),
    (
        "A's task, agent side",
        "get",
        "/api/agent/tasks/{task_a}/",
        None,
        {"agent A": 200, "agent B": 404, "agent D": 404, "anon": 401, "else": 403},
    ),
    (
        "A's task status",
        "post",
        "/api/agent/tasks/{task_a}/status/",
        {"state": "evaluating"},
        {"agent A": 200, "agent B": 404, "agent D": 404, "anon": 401, "else": 403},
    ),
    (
        "A's task metrics",
        "post",
        "/api/agent/tasks/{task_a}/metrics/",
        {"points": [{"name": "loss", "value": 1}]},
        {"agent A": 200, "agent B": 404, "agent D": 404, "anon": 401, "else": 403},
    ),
    (
        "A's task update",
        "put",
        "/api/agent/tasks/{task_a}/update/",
        b"not-an-update",
        {"agent A": 400, "agent B": 404, "agent D": 404, "anon": 401, "else": 403},
    ),
    (
        "next task",
        "get",
        "/api/agent/task/",
        None,
        {"agent A": 200, "agent B": 200, "agent D": 204, "anon": 401, "else": 403},
    ),
    (
        "model weights",
        "get",
        "/api/versions/{version}/weights/",
        None,
        {
            "alice": 200,
            "bob": 200,
            "dave": 200,
            "charlie": 200,
            "agent A": 200,
            "agent B": 200,
            **STRANGERS,
            "agent D": 404,
            "anon": 401,
        },
    ),
]

CELLS = [(row, role) for row in TABLE for role in ROLES if role in row[4] or "else" in row[4]]


@pytest.mark.parametrize(("row", "role"), CELLS, ids=[f"{row[0]} as {role}" for row, role in CELLS])
def test_access_table(world, client_for, row, role):
    name, method, path, body, expected = row
    client = _client(world, role, client_for)
    ids = _ids(world, role)
    url = path.format(**ids)
    if isinstance(body, dict):
        body = {
            k: int(v.format(**ids)) if isinstance(v, str) and v.startswith("{") else v
            for k, v in body.items()
        }
    if isinstance(body, bytes):
        response = client.generic(method.upper(), url, body, content_type="application/octet-stream")
    else:
        response = (
            getattr(client, method)(url, body, format="json")
            if body is not None
            else getattr(client, method)(url)
        )
    assert response.status_code == expected.get(role, expected.get("else")), response.content[:300]


def test_another_sites_agent_changes_nothing(world, client_for):
    client = client_for(token=world["tokens"]["agent B"])
    task_id = world["ids"]["task_a"]
    client.post(f"/api/agent/tasks/{task_id}/status/", {"state": "dropped", "reason": "x"}, format="json")
    client.post(
        f"/api/agent/tasks/{task_id}/metrics/", {"points": [{"name": "loss", "value": 1}]}, format="json"
    )
    client.generic(
        "PUT", f"/api/agent/tasks/{task_id}/update/", b"x", content_type="application/octet-stream"
    )
    task = Task.objects.get(pk=task_id)
    assert task.state == "assigned"
    assert not MetricPoint.objects.exists() and not Update.objects.exists()


def test_site_admin_sees_only_their_sites_rows(world, client_for):
    bob = client_for(world["users"]["bob"])
    ids = world["ids"]
    memberships = bob.get(f"/api/federations/{ids['fed']}/memberships/").json()
    assert [m["site_name"] for m in memberships] == ["Hospital A"]
    ledger = bob.get(f"/api/federations/{ids['fed']}/ledger/").json()
    assert ledger and {row["site_name"] for row in ledger} == {"Hospital A"}
    tasks = bob.get(f"/api/rounds/{ids['round']}/").json()["tasks"]
    assert [t["site_name"] for t in tasks] == ["Hospital A"]
    alice = client_for(world["users"]["alice"])
    assert {row["site_name"] for row in alice.get(f"/api/federations/{ids['fed']}/ledger/").json()} == {
        "Hospital A",
        "Hospital B",
    }


def test_agent_gets_only_its_own_next_task(world, client_for):
    task = client_for(token=world["tokens"]["agent A"]).get("/api/agent/task/").json()
    assert task["task"] == world["ids"]["task_a"]
    assert task["mechanism"] == "svt" and task["epsilon"] == "1.000000000000"


# --- The cross-federation hijack, replayed over HTTP -------------------------------------------


@pytest.mark.parametrize(("attacker", "own"), [("frank", "other_fed"), ("gina", "gina_fed")])
def test_adding_a_foreign_site_by_id_answers_exactly_like_a_missing_one(world, client_for, attacker, own):
    """frank coordinates another study; gina is staff with a study of her own. Neither may add the
    study's site A by guessing its id, through the API or the dashboard's join form."""
    user, federation_id, site_a = world["users"][attacker], world["ids"][own], world["ids"]["site_a"]
    api = client_for(user)
    url = f"/api/federations/{federation_id}/memberships/"
    body = {"budget": 5, "reason": "ours now"}
    foreign = api.post(url, {**body, "site": site_a}, format="json")
    missing = api.post(url, {**body, "site": 999999}, format="json")
    assert (foreign.status_code, foreign.json()) == (missing.status_code, missing.json())
    assert foreign.status_code == 404
    browser = Client()
    browser.force_login(user)
    joined = browser.post(f"/sites/{site_a}/join/", {"federation": federation_id, "budget": 5, "reason": "x"})
    assert joined.status_code == 404
    assert list(Membership.objects.filter(site_id=site_a).values_list("federation_id", flat=True)) == [
        world["ids"]["fed"]
    ]


@pytest.mark.parametrize("attacker", ["frank", "gina"])
def test_another_federations_coordinator_cannot_take_a_sites_token(world, client_for, sites, attacker):
    site_a, token_a = sites["A"]
    api = client_for(world["users"][attacker])
    assert api.post(f"/api/sites/{site_a.pk}/rotate-token/").status_code == 404
    assert api.post(f"/api/sites/{site_a.pk}/revoke/", {"reason": "x"}, format="json").status_code == 404
    browser = Client()
    browser.force_login(world["users"][attacker])
    assert browser.post(f"/sites/{site_a.pk}/rotate/").status_code == 404
    assert browser.post(f"/sites/{site_a.pk}/revoke/", {"reason": "x"}).status_code == 404
    assert services.site_authenticate(token_a) == site_a
    assert not AuditEvent.objects.filter(site=site_a, action__startswith="site.token").exists()


def test_a_site_invited_by_another_federation_gets_no_task_no_reservation_and_keeps_its_token(
    world, client_for, sites
):
    """Even with an invitation in place (as the hijack's first step made one), the inviting
    coordinator sees nothing of the site, cannot rotate its token, and its rounds leave it out."""
    frank = world["users"]["frank"]
    site_a, token_a = sites["A"]
    other = world["ids"]["other_fed"]
    services.membership_add(
        federation=Membership.objects.get(site__name="Hospital C").federation,
        site=site_a,
        budget=5,
        added_by=frank,
        reason="ours now",
    )
    api = client_for(frank)
    assert api.get(f"/api/sites/{site_a.pk}/").status_code == 404
    assert api.post(f"/api/sites/{site_a.pk}/rotate-token/").status_code == 404
    launched = api.post(f"/api/federations/{other}/rounds/", {"confirm_noise": True}, format="json")
    assert launched.status_code == 201, launched.content
    round_id = launched.json()["id"]
    assert not Task.objects.filter(round_id=round_id, site=site_a).exists()
    assert not LedgerEntry.objects.filter(round_id=round_id, membership__site=site_a).exists()
    assert [(e["name"], e["reason"]) for e in launched.json()["excluded_sites"]] == [
        ("Hospital A", "Hospital A has not accepted the invitation to this federation")
    ]
    work = client_for(token=token_a).get("/api/agent/task/").json()
    assert work["federation"] == "BraTS study" and work["task"] == world["ids"]["task_a"]
    assert services.site_authenticate(token_a) == site_a


def test_a_coordinator_sees_an_invited_site_only_as_invited_by_name(world, client_for):
    alice = client_for(world["users"]["alice"])
    listed = alice.get(f"/api/federations/{world['ids']['fed']}/memberships/").json()
    rows = {m["site_name"]: m for m in listed}
    assert (rows["Hospital A"]["status"], rows["Hospital D"]["status"]) == ("accepted", "invited")
    assert rows["Hospital D"]["balance"] == {}
    assert alice.get(f"/api/sites/{world['ids']['site_d']}/").status_code == 404
    assert "Hospital D" not in {site["name"] for site in alice.get("/api/sites/").json()}
    ivy = client_for(world["users"]["ivy"])
    assert ivy.get(f"/api/sites/{world['ids']['site_d']}/").json()["name"] == "Hospital D"


@pytest.mark.parametrize(
    ("role", "excluded"),
    [
        ("alice", ["Hospital B", "Hospital D"]),
        ("charlie", ["Hospital B", "Hospital D"]),
        ("bob", []),
        ("dave", ["Hospital B"]),
    ],
)
def test_a_rounds_left_out_sites_and_their_balances_show_only_to_who_may_see_them(
    world, client_for, sites, alice, federation, role, excluded
):
    services.budget_set(
        membership=sites["B"][0].memberships.get(), budget=1, changed_by=alice, reason="cut"
    )  # B's 1 epsilon is reserved by round 1: the next round leaves it out
    round_ = services.round_launch(federation=federation, launched_by=alice)
    api = client_for(world["users"][role])
    listed = api.get(f"/api/federations/{federation.pk}/rounds/").json()
    detail = api.get(f"/api/rounds/{round_.pk}/").json()
    assert [e["name"] for e in listed[0]["excluded_sites"]] == excluded
    assert [e["name"] for e in detail["excluded_sites"]] == excluded
    assert {e["name"] for r in listed for e in r["excluded_sites"]} <= set(excluded)
