"""Site tokens: shown once, stored only as a hash, never echoed, and useless once revoked;
rotated and revoked only by the site's own admins (its registrant while it has none), one
rotation at a time."""

import logging
import threading

import pytest
from django.db import connection, connections
from django.test import Client

from coordinator import services
from coordinator.models import AuditEvent


def _every_text_in_the_database() -> str:
    """All rows of every table as text: where a leaked token would show up."""
    chunks = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT * FROM "{table}"')
            chunks.extend(repr(row) for row in cursor.fetchall())
    return "\n".join(chunks)


def test_token_is_shown_once_and_stored_only_as_a_hash(client_for, alice, caplog):
    caplog.set_level(logging.DEBUG)
    created = client_for(alice).post("/api/sites/", {"name": "Hospital Z"}, format="json")
    assert created.status_code == 201
    token = created.json()["token"]
    assert token.startswith("site_") and len(token) > 40
    site_id = created.json()["site"]["id"]

    later = [
        client_for(alice).get("/api/sites/").content,
        client_for(alice).get(f"/api/sites/{site_id}/").content,
        client_for(token=token).get("/api/agent/task/").content,
    ]
    assert all(token.encode() not in body for body in later)
    assert token not in _every_text_in_the_database()
    assert token not in caplog.text


def test_missing_or_unknown_token_gets_401(db, client_for):
    assert client_for().get("/api/agent/task/").status_code == 401
    assert client_for(token="site_not-a-real-token").get("/api/agent/task/").status_code == 401


def test_revoked_token_gets_401_and_rotation_issues_a_new_one(client_for, bob, sites):
    site, token = sites["A"]
    assert client_for(token=token).get("/api/agent/task/").status_code == 204
    revoked = client_for(bob).post(
        f"/api/sites/{site.pk}/revoke/", {"reason": "laptop stolen"}, format="json"
    )
    assert revoked.status_code == 200
    assert client_for(token=token).get("/api/agent/task/").status_code == 401

    rotated = client_for(bob).post(f"/api/sites/{site.pk}/rotate-token/").json()["token"]
    assert rotated != token
    assert client_for(token=token).get("/api/agent/task/").status_code == 401
    assert client_for(token=rotated).get("/api/agent/task/").status_code == 204


def test_personal_token_authenticates_a_person_not_an_agent(client_for, alice, sites):
    token = client_for(alice).post("/api/tokens/", {"name": "script"}, format="json").json()["token"]
    assert token.startswith("user_")
    assert client_for(token=token).get("/api/federations/").status_code == 200
    assert client_for(token=token).get("/api/agent/task/").status_code == 403
    site_token = sites["A"][1]
    assert client_for(token=site_token).get("/api/federations/").status_code == 403


@pytest.mark.parametrize("header", ["Bearer", "Bearer    ", "Token abc"])
def test_malformed_authorization_is_refused(db, client_for, header):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    assert client.get("/api/agent/task/").status_code == 401


def test_rotating_through_the_service_invalidates_the_old_hash(alice, sites):
    site, token = sites["B"]
    new = services.site_token_rotate(site=site, rotated_by=alice)
    assert services.site_authenticate(token) is None
    assert services.site_authenticate(new) == site


def test_no_secret_reaches_a_log_record_at_debug(client_for, alice, caplog, settings):
    """A whole flow with every logger (SQL included) at DEBUG: registering a site, its agent's
    requests, a personal token in use, sign-ins that fail and succeed."""
    from django.test import Client

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="django.db.backends")
    connection.force_debug_cursor = True  # SQL is logged only with a debug cursor
    try:
        site_token = (
            client_for(alice).post("/api/sites/", {"name": "Hospital Z"}, format="json").json()["token"]
        )
        assert client_for(token=site_token).get("/api/agent/task/").status_code == 204
        personal = client_for(alice).post("/api/tokens/", {"name": "script"}, format="json").json()["token"]
        assert client_for(token=personal).get("/api/federations/").status_code == 200
        assert client_for(token=site_token[:-4] + "abcd").get("/api/agent/task/").status_code == 401
        wrong_password = "not-alices-password-4711"
        browser = Client()
        assert browser.post("/login/", {"username": "alice", "password": wrong_password}).status_code == 200
        assert (
            browser.post("/login/", {"username": "alice", "password": "alice-password-123"}).status_code
            == 302
        )
    finally:
        connection.force_debug_cursor = False
    logged = "\n".join(f"{record.getMessage()} {vars(record)!r}" for record in caplog.records)
    assert "coordinator_personaltoken" in logged and "Unauthorized: /api/agent/task/" in logged
    for secret in (site_token, personal, wrong_password, "alice-password-123", settings.SECRET_KEY):
        assert secret not in logged


# --- Who may rotate or revoke: the site's own admins --------------------------------------------


def test_the_sites_coordinator_may_not_rotate_or_revoke_its_token(client_for, alice, sites):
    site, token = sites["A"]
    api = client_for(alice)  # coordinates the study, and registered the site
    rotated = api.post(f"/api/sites/{site.pk}/rotate-token/")
    assert rotated.status_code == 403
    assert "only the site's admins" in rotated.json()["error"]
    assert api.post(f"/api/sites/{site.pk}/revoke/", {"reason": "x"}, format="json").status_code == 403
    browser = Client()
    browser.force_login(alice)
    assert browser.post(f"/sites/{site.pk}/rotate/").status_code == 403
    assert services.site_authenticate(token) == site


def test_the_registrant_rotates_only_while_the_site_has_no_admins(client_for, alice, bob):
    site, _ = services.site_register(name="Hospital Z", registered_by=alice)
    assert client_for(alice).post(f"/api/sites/{site.pk}/rotate-token/").status_code == 200
    services.site_admin_add(site=site, user=bob, added_by=alice)
    assert client_for(alice).post(f"/api/sites/{site.pk}/rotate-token/").status_code == 404
    assert (
        client_for(bob).post(f"/api/sites/{site.pk}/revoke/", {"reason": "x"}, format="json").status_code
        == 200
    )


# --- Rotations at the same moment ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_of_simultaneous_rotations_one_wins_and_its_token_works(client_for, bob, sites):
    """Twenty rotations at once (the double-clicked button, the retrying script): exactly one is
    answered with a token, and that token works; the others get 409 and no token."""
    site, _ = sites["A"]
    start = threading.Barrier(20)
    answers: list = []

    def rotate() -> None:
        client = client_for(bob)
        # Signing in took a pooled connection (PostgreSQL's pool holds 10): give it back before
        # waiting, or ten threads hold them all at the barrier while ten wait for one.
        connections.close_all()
        start.wait()
        try:
            answers.append(client.post(f"/api/sites/{site.pk}/rotate-token/"))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=rotate) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(a.status_code for a in answers) == [200] + [409] * 19
    (winner,) = [a.json()["token"] for a in answers if a.status_code == 200]
    assert services.site_authenticate(winner) == site
    refusal = next(a.json()["error"] for a in answers if a.status_code == 409)
    assert "token was just rotated" in refusal
    assert AuditEvent.objects.filter(site=site, action="site.token_rotated").count() == 1
