"""Uploading an update: stored once, epsilon committed once, bad updates recorded and refused."""

from decimal import Decimal

from django.conf import settings

from coordinator import accounting, services, storage
from coordinator.models import LedgerEntry, LedgerKind, Membership, Task, Update

from .conftest import SVT_PARAMS
from .factories import svt_update


def _upload(client_for, token, task, data):
    return client_for(token=token).generic(
        "PUT", f"/api/agent/tasks/{task.pk}/update/", data, content_type="application/octet-stream"
    )


def _task(round_, site):
    return Task.objects.get(round=round_, site=site)


def test_retried_upload_commits_epsilon_once(client_for, alice, federation, sites):
    site, token = sites["A"]
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task = _task(round_, site)
    data = svt_update(round_.base_version.n_parameters, SVT_PARAMS)
    first = _upload(client_for, token, task, data)
    # The answer was lost on the way back; the agent sends the same bytes again.
    second = _upload(client_for, token, task, data)
    assert first.status_code == second.status_code == 200, first.content
    assert first.json() == second.json()
    assert Update.objects.filter(task=task).count() == 1
    commits = LedgerEntry.objects.filter(round=round_, membership__site=site, kind=LedgerKind.COMMIT)
    assert [c.epsilon for c in commits] == [Decimal(1)]
    balance = accounting.membership_balance(Membership.objects.get(site=site))
    assert (balance.committed, balance.reserved, balance.remaining) == (1, 0, 1)
    assert _task(round_, site).state == "uploaded"


def test_a_second_different_update_is_refused(client_for, alice, federation, sites):
    site, token = sites["A"]
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task = _task(round_, site)
    n = round_.base_version.n_parameters
    assert _upload(client_for, token, task, svt_update(n, SVT_PARAMS, seed=1)).status_code == 200
    again = _upload(client_for, token, task, svt_update(n, SVT_PARAMS, seed=2))
    assert again.status_code == 409 and "uploaded once" in again.json()["error"]
    assert LedgerEntry.objects.filter(round=round_, kind=LedgerKind.COMMIT).count() == 1


def test_garbage_is_refused_with_nothing_stored_so_the_agent_can_retry(client_for, alice, federation, sites):
    site, token = sites["A"]
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task = _task(round_, site)
    response = _upload(client_for, token, task, b"\x00" * 100)
    assert response.status_code == 400 and "not a valid update" in response.json()["error"]
    assert not Update.objects.exists()
    assert not LedgerEntry.objects.filter(kind=LedgerKind.COMMIT).exists()
    assert (
        _upload(client_for, token, task, svt_update(round_.base_version.n_parameters, SVT_PARAMS)).status_code
        == 200
    )


def test_an_update_breaking_the_rounds_rules_is_recorded_rejected_and_still_spends(
    client_for, alice, federation, sites
):
    site, token = sites["A"]
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task = _task(round_, site)
    wrong = svt_update(round_.base_version.n_parameters, {**SVT_PARAMS, "gamma": 0.5})
    response = _upload(client_for, token, task, wrong)
    assert response.status_code == 422
    assert "gamma" in response.json()["error"]
    update = Update.objects.get(task=task)
    assert update.status == "rejected" and "gamma" in update.rejection_reason
    # Recorded for the audit by its hash; its bytes are not kept.
    assert update.path == "" and update.sha256 == storage.sha256_of(wrong)
    assert not (settings.STORAGE_DIR / "updates").exists()
    task.refresh_from_db()
    assert task.state == "dropped" and "rejected" in task.reason
    # Its values left the site: the reservation is committed, not released.
    assert (
        LedgerEntry.objects.filter(round=round_, membership__site=site, kind=LedgerKind.COMMIT).count() == 1
    )


def test_upload_after_the_round_closed_is_refused_and_charged(client_for, alice, federation, sites):
    site, token = sites["A"]
    round_ = services.round_launch(federation=federation, launched_by=alice)
    services.round_abort(round_=round_, aborted_by=alice, reason="stop")
    response = _upload(
        client_for, token, _task(round_, site), svt_update(round_.base_version.n_parameters, SVT_PARAMS)
    )
    assert response.status_code == 409
    # Its reservation was released, but its values left the site: the late update is charged.
    commits = LedgerEntry.objects.filter(kind=LedgerKind.COMMIT)
    assert [(c.membership.site, c.reason) for c in commits] == [
        (site, "late upload: not used, but its values left the site")
    ]
    balance = accounting.membership_balance(commits[0].membership)
    assert (balance.committed, balance.reserved) == (1, 0)


def test_bytes_that_are_no_update_are_not_charged_when_late(client_for, alice, federation, sites):
    site, token = sites["A"]
    round_ = services.round_launch(federation=federation, launched_by=alice)
    services.round_abort(round_=round_, aborted_by=alice, reason="stop")
    assert _upload(client_for, token, _task(round_, site), b"not an update").status_code == 409
    assert not LedgerEntry.objects.filter(kind=LedgerKind.COMMIT).exists()
