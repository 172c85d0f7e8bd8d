"""A database error inside a state change leaves nothing half-written and announces nothing.

The error is a real one raised by the database layer in the middle of the service's
transaction (Django's execute_wrapper fails one chosen statement), on SQLite or PostgreSQL;
the check is that every row the service had already written is gone with it, that no live
event went out for a change that never happened, and that doing it again then works.
"""

from __future__ import annotations

import contextlib
import re

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import DatabaseError, connection

from coordinator import accounting, events, services, storage
from coordinator.models import AuditEvent, LedgerEntry, Membership, ModelVersion, Round, Task, Update

from .conftest import SVT_PARAMS
from .factories import svt_update

pytestmark = pytest.mark.django_db(transaction=True)


@contextlib.contextmanager
def failing(statement: str, *, nth: int = 1):
    """Make the ``nth`` SQL statement matching ``statement`` (a regex) fail inside the database layer."""
    pattern = re.compile(statement, re.IGNORECASE)
    seen = 0

    def wrapper(execute, sql, params, many, context):
        nonlocal seen
        if pattern.search(sql):
            seen += 1
            if seen == nth:
                raise DatabaseError(f"injected failure of: {sql[:60]}")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield
    assert seen >= nth, f"the service never ran a statement matching {statement!r}"


@contextlib.contextmanager
def listening(*groups: str):
    """Collect the live events sent to ``groups`` over the real channel layer meanwhile."""
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    for group in groups:
        async_to_sync(layer.group_add)(group, channel)
    heard: list[dict] = []
    yield heard

    async def drain() -> None:
        import asyncio

        while True:
            try:
                message = await asyncio.wait_for(layer.receive(channel), timeout=0.5)
            except TimeoutError:
                return
            heard.append(message["event"])

    async_to_sync(drain)()
    for group in groups:
        async_to_sync(layer.group_discard)(group, channel)


def _blobs(kind: str) -> list:
    return sorted((storage.root() / kind).rglob("*.safetensors"))


def _counts() -> dict[str, int]:
    models = (Round, Task, LedgerEntry, Update, ModelVersion, AuditEvent)
    return {model.__name__: model.objects.count() for model in models}


def test_a_launch_failing_at_its_last_reservation_writes_nothing(alice, federation, sites):
    before = _counts()
    with (
        listening(events.federation_group(federation.pk)) as heard,
        failing(r"INSERT INTO \"?coordinator_ledgerentry", nth=2),
        pytest.raises(DatabaseError),
    ):
        services.round_launch(federation=federation, launched_by=alice)
    assert _counts() == before
    assert heard == []

    round_ = services.round_launch(federation=federation, launched_by=alice)
    assert round_.number == 1 and round_.tasks.count() == 2
    assert LedgerEntry.objects.filter(round=round_, kind="reserve").count() == 2


def test_an_upload_failing_at_its_commit_stores_no_update_and_can_be_sent_again(alice, federation, sites):
    round_ = services.round_launch(federation=federation, launched_by=alice)
    task = Task.objects.filter(round=round_).first()
    data = svt_update(round_.base_version.n_parameters, SVT_PARAMS)
    before = _counts()
    with (
        listening(events.round_group(round_.pk)) as heard,
        failing(r"INSERT INTO \"?coordinator_ledgerentry"),
        pytest.raises(DatabaseError),
    ):
        services.update_accept(task=task, data=data)
    assert _counts() == before
    assert heard == []
    assert _blobs("updates") == []
    task.refresh_from_db()
    assert task.state == "assigned"
    assert accounting.membership_balance(Membership.objects.get(site=task.site)).reserved > 0

    services.update_accept(task=task, data=data)
    assert Update.objects.filter(task=task).count() == 1
    assert LedgerEntry.objects.filter(round=round_, membership__site=task.site, kind="commit").count() == 1


def test_an_aggregation_failing_as_it_finishes_the_round_stores_no_version_and_runs_again(
    alice, federation, sites
):
    round_ = services.round_launch(federation=federation, launched_by=alice)
    for seed, task in enumerate(Task.objects.filter(round=round_)):
        services.update_accept(
            task=task, data=svt_update(round_.base_version.n_parameters, SVT_PARAMS, seed=seed)
        )
    round_.refresh_from_db()
    assert round_.state == "aggregating"
    with (
        listening(events.round_group(round_.pk)) as heard,
        failing(r"UPDATE \"?coordinator_round\"? SET .*state"),
        pytest.raises(DatabaseError),
    ):
        services.round_aggregate(round_id=round_.pk)
    round_.refresh_from_db()
    assert round_.state == "aggregating"
    assert not ModelVersion.objects.filter(produced_by=round_).exists()
    assert heard == []
    assert len(_blobs("versions")) == 1  # the base version's only

    assert services.round_aggregate(round_id=round_.pk) == "version 1"
    assert ModelVersion.objects.filter(produced_by=round_).count() == 1


def test_a_budget_change_failing_at_its_audit_record_changes_nothing(alice, federation, sites):
    membership = Membership.objects.get(site=sites["A"][0])
    with failing(r"INSERT INTO \"?coordinator_auditevent"), pytest.raises(DatabaseError):
        services.budget_set(membership=membership, budget=7, changed_by=alice, reason="more scans")
    membership.refresh_from_db()
    assert membership.budget_epsilon == 2
    assert not AuditEvent.objects.filter(action="budget.changed").exists()
