"""Every state change of the domain: one function each, in a transaction, events sent on commit.

Functions are keyword-only and named ``<entity>_<verb>``. They raise the errors in
coordinator.errors with messages a person can act on; nothing is written when they raise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import secrets
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F, Max, Q
from django.utils import timezone

from coordinator import events, storage, weights
from coordinator.accounting import (
    RoundCost,
    balances_for,
    delta_from_input,
    epsilon_from_input,
    open_reservations,
    participation_refusal,
    round_cost,
    show,
)
from coordinator.errors import Conflict, InvalidInput, LaunchRefused, TooLarge, UpdateRejectedError
from coordinator.models import (
    ACTIVE_MEMBERSHIP,
    DEFAULT_BUDGET_DELTA,
    ROUND_OPEN_STATES,
    AuditEvent,
    Federation,
    LedgerEntry,
    LedgerKind,
    Membership,
    MembershipStatus,
    MetricPoint,
    ModelVersion,
    PersonalToken,
    Round,
    RoundState,
    Site,
    Task,
    TaskState,
    Update,
    UpdateStatus,
    token_hash,
)
from sitesagent import protocol
from sitesagent.model import preset

log = logging.getLogger(__name__)

DEFAULT_MECHANISM_PARAMS = {
    protocol.MECHANISM_SVT: protocol.DEFAULT_SVT_PARAMS,
    protocol.MECHANISM_DPSGD: protocol.DEFAULT_DPSGD_PARAMS,
}
DEFAULT_TRAINING = {"local_epochs": 1, "max_iterations": 0, "batch_size": 1, "lr": 1e-4, "roi_size": 64}


def _audit(
    action: str, *, actor=None, actor_site=None, federation=None, site=None, round_=None, reason="", **details
):
    AuditEvent.objects.create(
        action=action,
        actor=actor,
        actor_site=actor_site,
        federation=federation,
        site=site,
        round=round_,
        reason=reason,
        details=details,
    )


def _require_reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise InvalidInput("a reason is required: it goes into the audit log")
    return reason


# ---------------------------------------------------------------------------------------------
# Federations and model versions


def federation_create(
    *,
    name: str,
    created_by,
    model_config: dict | None = None,
    model_seed: int = 0,
    min_sites: int = 1,
    round_deadline_seconds: int = 3600,
    default_mechanism: str = protocol.MECHANISM_DPSGD,
    default_mechanism_params: dict | None = None,
    budget_delta: Any = DEFAULT_BUDGET_DELTA,
    training_defaults: dict | None = None,
    aggregation_rule: str = "mean",
    trim_fraction: float = 0.1,
    update_norm_bound: float | None = None,
) -> Federation:
    """Create a federation and its seeded initial model version (version 0)."""
    name = (name or "").strip()
    if not name:
        raise InvalidInput("a federation needs a name")
    if Federation.objects.filter(name=name).exists():
        raise Conflict(f"a federation named {name!r} already exists")
    if min_sites < 1:
        raise InvalidInput(f"min_sites must be at least 1, not {min_sites}")
    if round_deadline_seconds < 1:
        raise InvalidInput(f"round_deadline_seconds must be at least 1, not {round_deadline_seconds}")
    mechanism_params = (
        default_mechanism_params
        if default_mechanism_params is not None
        else dict(DEFAULT_MECHANISM_PARAMS.get(default_mechanism, {}))
    )
    round_cost(default_mechanism, mechanism_params)  # validates them
    budget_delta = delta_from_input("budget_delta", budget_delta)
    model_config = dict(model_config if model_config is not None else preset("brats").to_dict())
    try:
        initial = weights.initial_weights(model_config, model_seed)
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"model_config is not a valid model: {error}") from None
    with transaction.atomic():
        federation = Federation.objects.create(
            name=name,
            model_config=model_config,
            model_seed=model_seed,
            min_sites=min_sites,
            round_deadline_seconds=round_deadline_seconds,
            default_mechanism=default_mechanism,
            default_mechanism_params=mechanism_params,
            budget_delta=budget_delta,
            training_defaults={**DEFAULT_TRAINING, **(training_defaults or {})},
            aggregation_rule=aggregation_rule,
            trim_fraction=trim_fraction,
            update_norm_bound=update_norm_bound,
            created_by=created_by,
        )
        if created_by is not None:
            federation.coordinators.add(created_by)
        model_version_store(federation=federation, data=initial, base=None, produced_by=None)
        _audit("federation.created", actor=created_by, federation=federation, model_config=model_config)
    return federation


def model_version_store(
    *, federation: Federation, data: bytes, base: ModelVersion | None, produced_by: Round | None
) -> ModelVersion:
    path, digest = storage.put("versions", data)
    number = (federation.versions.aggregate(n=Max("number"))["n"] + 1) if base is not None else 0
    return ModelVersion.objects.create(
        federation=federation,
        number=number,
        base=base,
        produced_by=produced_by,
        path=path,
        sha256=digest,
        size_bytes=len(data),
        n_parameters=weights.parameter_count(weights.bytes_to_state(data)),
    )


# ---------------------------------------------------------------------------------------------
# Sites and tokens


def _new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def site_register(*, name: str, registered_by) -> tuple[Site, str]:
    """Register a site; return it and its token, which is shown this once and stored only hashed."""
    name = (name or "").strip()
    if not name:
        raise InvalidInput("a site needs a name")
    if Site.objects.filter(name=name).exists():
        raise Conflict(f"a site named {name!r} already exists")
    token = _new_secret(protocol.SITE_TOKEN_PREFIX)
    now = timezone.now()
    with transaction.atomic():
        # token_rotated_at == created_at says "never rotated" (site_token_rotate relies on it).
        site = Site.objects.create(
            name=name,
            token_hash=token_hash(token),
            created_by=registered_by,
            created_at=now,
            token_rotated_at=now,
        )
        _audit("site.registered", actor=registered_by, site=site)
    return site, token


def site_token_rotate(*, site: Site, rotated_by) -> str:
    """Replace the site's token: the old one stops working at once, its open agent sockets close,
    and a revoked site is restored.

    Of rotations within TOKEN_ROTATION_INTERVAL_SECONDS of each other, one wins and the others
    get Conflict: otherwise each would answer with a token that the next had already killed. The
    check and the write are one conditional UPDATE, so it holds on every database.
    """
    token = _new_secret(protocol.SITE_TOKEN_PREFIX)
    now = timezone.now()
    recent = now - timedelta(seconds=settings.TOKEN_ROTATION_INTERVAL_SECONDS)
    with transaction.atomic():
        rotated = (
            Site.objects.filter(pk=site.pk)
            .filter(Q(token_rotated_at__lte=recent) | Q(token_rotated_at=F("created_at")))
            .update(token_hash=token_hash(token), token_rotated_at=now, revoked_at=None)
        )
        if not rotated:
            raise Conflict(
                f"{site}'s token was just rotated: the token that rotation returned is the one that "
                f"works. Rotate again after {settings.TOKEN_ROTATION_INTERVAL_SECONDS} s if it is lost."
            )
        site.refresh_from_db(fields=["token_hash", "token_rotated_at", "revoked_at"])
        _audit("site.token_rotated", actor=rotated_by, site=site)
        events.close_agent_sockets_on_commit(site.pk)
    return token


def site_token_revoke(*, site: Site, revoked_by, reason: str = "") -> None:
    """Stop the site's token at once: HTTP answers 401 and its open agent sockets close."""
    with transaction.atomic():
        site.revoked_at = timezone.now()
        site.save(update_fields=["revoked_at"])
        _audit("site.token_revoked", actor=revoked_by, site=site, reason=reason)
        events.close_agent_sockets_on_commit(site.pk)


def site_admin_add(*, site: Site, user, added_by) -> None:
    with transaction.atomic():
        site.admins.add(user)
        _audit("site.admin_added", actor=added_by, site=site, user=user.get_username())


def site_authenticate(token: str) -> Site | None:
    """The site a bearer token belongs to, or None when it is unknown or revoked."""
    return Site.objects.filter(token_hash=token_hash(token), revoked_at__isnull=True).first()


def site_heartbeat(*, site: Site, info: Any = None) -> None:
    """Record that the agent is alive, and what it says about itself (device, cases, data check).

    ``info`` is merged into what the agent said before; a merged record past AGENT_INFO_MAX_KEYS
    keys or AGENT_INFO_MAX_BYTES bytes is refused whole (TooLarge), the stored one unchanged.
    """
    fields = ["last_seen_at"]
    if info:
        site.agent_info = _bounded_agent_info({**site.agent_info, **_info_object(info)})
        fields.append("agent_info")
    site.last_seen_at = timezone.now()
    site.save(update_fields=fields)
    federations = site.memberships.filter(ACTIVE_MEMBERSHIP).values_list("federation_id", flat=True)
    events.send_now(
        [events.site_group(site.pk)] + [events.federation_group(f) for f in federations],
        {"type": "site.seen", "site": site.pk, "at": site.last_seen_at.isoformat(), "info": site.agent_info},
    )


def _info_object(info: Any) -> dict:
    if not isinstance(info, dict):
        raise InvalidInput(f"info must be a JSON object, not {type(info).__name__}")
    return info


def _bounded_agent_info(merged: dict) -> dict:
    max_keys, max_bytes = settings.AGENT_INFO_MAX_KEYS, settings.AGENT_INFO_MAX_BYTES
    if len(merged) > max_keys:
        raise TooLarge(
            f"agent info may have at most {max_keys} keys; with this heartbeat it has {len(merged)}"
        )
    size = len(json.dumps(merged, separators=(",", ":")).encode())
    if size > max_bytes:
        raise TooLarge(
            f"agent info may take at most {max_bytes} bytes as JSON; with this heartbeat it takes {size}"
        )
    return merged


def personal_token_create(*, user, name: str) -> str:
    token = _new_secret(protocol.USER_TOKEN_PREFIX)
    PersonalToken.objects.create(user=user, name=name or "api", token_hash=token_hash(token))
    return token


# ---------------------------------------------------------------------------------------------
# Memberships and budgets


def membership_add(
    *,
    federation: Federation,
    site: Site,
    budget: Any,
    allows_unprotected_sharing: bool = False,
    added_by,
    reason: str,
    budget_delta: Any = None,
) -> Membership:
    """Invite a site with a budget of (budget, budget_delta), the delta by default the
    federation's: it takes part once its admins accept (membership_accept)."""
    reason = _require_reason(reason)
    budget_value = epsilon_from_input("budget", budget)
    delta = (
        federation.budget_delta if budget_delta is None else delta_from_input("budget_delta", budget_delta)
    )
    with transaction.atomic():
        existing = Membership.objects.filter(federation=federation, site=site).first()
        if existing is not None:
            raise Conflict(f"{site} is already {existing.status} in {federation}")
        membership = Membership.objects.create(
            federation=federation,
            site=site,
            budget_epsilon=budget_value,
            budget_delta=delta,
            allows_unprotected_sharing=allows_unprotected_sharing,
        )
        _audit(
            "membership.invited",
            actor=added_by,
            federation=federation,
            site=site,
            reason=reason,
            budget=str(budget_value),
            delta=delta,
            allows_unprotected_sharing=allows_unprotected_sharing,
        )
        _send_membership_event(membership)
    return membership


def membership_accept(*, membership: Membership, accepted_by) -> Membership:
    """The site accepts its invitation: from now on it gets tasks from this federation."""
    with transaction.atomic():
        membership = (
            Membership.objects.select_for_update().select_related("site", "federation").get(pk=membership.pk)
        )
        if membership.status != MembershipStatus.INVITED:
            raise Conflict(f"{membership.site} is already {membership.status} in {membership.federation}")
        membership.accepted_at = timezone.now()
        membership.accepted_by = accepted_by
        membership.save(update_fields=["accepted_at", "accepted_by"])
        _audit(
            "membership.accepted", actor=accepted_by, federation=membership.federation, site=membership.site
        )
        _send_membership_event(membership)
    return membership


def membership_leave(*, membership: Membership, left_by, reason: str = "") -> Membership:
    """The site leaves the federation (or declines its invitation): its unfinished tasks there are
    dropped and their reservations released; its ledger stays, as every ledger does."""
    with transaction.atomic():
        membership = (
            Membership.objects.select_for_update().select_related("site", "federation").get(pk=membership.pk)
        )
        if membership.status == MembershipStatus.LEFT:
            raise Conflict(f"{membership.site} already left {membership.federation}")
        membership.left_at = timezone.now()
        membership.save(update_fields=["left_at"])
        dropped = _drop_open_tasks(membership, reason="the site left the federation")
        _audit(
            "membership.left",
            actor=left_by,
            federation=membership.federation,
            site=membership.site,
            reason=(reason or "").strip(),
            dropped_tasks=[task.pk for task in dropped],
        )
        _send_membership_event(membership)
        for round_id in {task.round_id for task in dropped}:
            transaction.on_commit(functools.partial(round_check_completion, round_id=round_id))
    return membership


def _drop_open_tasks(membership: Membership, *, reason: str) -> list[Task]:
    """Drop the site's unfinished tasks in the federation's open rounds, releasing their epsilon."""
    tasks = list(
        Task.objects.select_for_update()
        .select_related("round", "site")
        .filter(
            site=membership.site,
            round__federation=membership.federation,
            round__state__in=[RoundState.RESERVED, RoundState.TRAINING],
            state__in=_TASK_ORDER,
        )
    )
    for task in tasks:
        _task_drop(task, reason=reason)
    return tasks


def _send_membership_event(membership: Membership) -> None:
    events.send_on_commit(
        events.site_scoped_groups(
            federation_id=membership.federation_id, round_id=None, site_id=membership.site_id
        ),
        {"type": "membership.changed", "site": membership.site_id, "status": membership.status},
    )


def budget_set(
    *,
    membership: Membership,
    budget: Any,
    changed_by,
    reason: str,
    allows_unprotected_sharing: bool | None = None,
) -> Membership:
    """Change a site's budget, audited with a reason.

    Never below what the site has committed and reserved: a reservation is a promise to a
    running round, and its upload commits it whatever the budget says by then.
    """
    reason = _require_reason(reason)
    new_budget = epsilon_from_input("budget", budget)
    with transaction.atomic():
        membership = Membership.objects.select_for_update().get(pk=membership.pk)
        balance = balances_for([membership])[membership.pk]
        held = balance.committed + balance.reserved
        if new_budget < held:
            raise InvalidInput(
                f"budget {show(new_budget)} is below the epsilon {show(held)} that {membership.site} has "
                f"already spent or reserved in {membership.federation} (at delta {balance.delta:g})"
            )
        old_budget = membership.budget_epsilon
        membership.budget_epsilon = new_budget
        fields = ["budget_epsilon"]
        if allows_unprotected_sharing is not None:
            membership.allows_unprotected_sharing = allows_unprotected_sharing
            fields.append("allows_unprotected_sharing")
        membership.save(update_fields=fields)
        _audit(
            "budget.changed",
            actor=changed_by,
            federation=membership.federation,
            site=membership.site,
            reason=reason,
            old=str(old_budget),
            new=str(new_budget),
            allows_unprotected_sharing=membership.allows_unprotected_sharing,
        )
        events.send_on_commit(
            events.site_scoped_groups(
                federation_id=membership.federation_id, round_id=None, site_id=membership.site_id
            ),
            {"type": "budget.changed", "site": membership.site_id, "budget": str(new_budget)},
        )
    return membership


# ---------------------------------------------------------------------------------------------
# Rounds


def _training_params(federation: Federation, overrides: dict | None) -> dict:
    params = {**DEFAULT_TRAINING, **federation.training_defaults, **(overrides or {})}
    for name in ("local_epochs", "max_iterations", "batch_size", "roi_size"):
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(
                f"training parameter {name} must be a whole number, zero or more, not {value!r}"
            )
    if params["local_epochs"] == 0 and params["max_iterations"] == 0:
        raise InvalidInput("training needs local_epochs or max_iterations above zero")
    if params["batch_size"] < 1 or params["roi_size"] < 8:
        raise InvalidInput("batch_size must be at least 1 and roi_size at least 8")
    lr = params.get("lr")
    try:
        protocol.positive_finite("lr", lr)
    except protocol.ProtocolError as error:
        raise InvalidInput(str(error)) from None
    return params


def round_launch(
    *,
    federation: Federation,
    launched_by,
    site_ids: list[int] | None = None,
    mechanism: str | None = None,
    mechanism_params: dict | None = None,
    training_params: dict | None = None,
    deadline_seconds: int | None = None,
    min_sites: int | None = None,
) -> Round:
    """Launch a round: reserve each asked site's epsilon, all in one transaction (DESIGN 5.1).

    Sites without budget (or not allowing an unprotected mechanism) are left out with the reason
    recorded on the round. With fewer than the minimum left, nothing is written and
    LaunchRefused names every site and its balance.
    """
    mechanism = mechanism or federation.default_mechanism
    params = mechanism_params if mechanism_params is not None else federation.default_mechanism_params
    cost = round_cost(mechanism, params)
    training = _training_params(federation, training_params)
    deadline_seconds = deadline_seconds or federation.round_deadline_seconds
    if deadline_seconds < 1:
        raise InvalidInput(f"deadline_seconds must be at least 1, not {deadline_seconds}")
    min_sites = min_sites or federation.min_sites

    with transaction.atomic():
        # One launch per federation at a time: the balances read below cannot change under us.
        federation = Federation.objects.select_for_update().get(pk=federation.pk)
        memberships = {
            m.site_id: m for m in federation.memberships.select_for_update().select_related("site")
        }
        asked = (
            site_ids if site_ids is not None else sorted(k for k, m in memberships.items() if not m.left_at)
        )
        if not asked:
            raise LaunchRefused(f"{federation} has no sites to ask")
        balances = balances_for(memberships.values())
        included: list[Membership] = []
        excluded: list[dict[str, Any]] = []
        for site_id in asked:
            membership = memberships.get(site_id)
            site = membership.site if membership else Site.objects.filter(pk=site_id).first()
            if site is None:
                raise InvalidInput(f"there is no site with id {site_id}")
            balance = balances[membership.pk] if membership else None
            reason = participation_refusal(membership, site, cost, balance)
            if reason:
                excluded.append(
                    {
                        "site": site.pk,
                        "name": site.name,
                        "reason": reason,
                        "remaining": (
                            str(balance.remaining)
                            if balance and membership and membership.is_active
                            else None
                        ),
                    }
                )
            else:
                assert membership is not None  # no reason means a member
                included.append(membership)
        if len(included) < min_sites:
            lines = "; ".join(e["reason"] for e in excluded)
            raise LaunchRefused(
                f"only {len(included)} of the asked sites can take part, the minimum is {min_sites}: {lines}",
                details={"excluded": excluded},
            )
        base = federation.latest_version()
        if base is None:
            raise Conflict(f"{federation} has no model version to start from")
        number = (federation.rounds.aggregate(n=Max("number"))["n"] or 0) + 1
        round_ = Round.objects.create(
            federation=federation,
            number=number,
            base_version=base,
            mechanism=mechanism,
            mechanism_params=cost.params,
            dp_event=cost.event,
            epsilon_per_site=cost.epsilon_at(federation.budget_delta),
            training_params=training,
            min_sites=min_sites,
            deadline=timezone.now() + timedelta(seconds=deadline_seconds),
            excluded_sites=excluded,
            launched_by=launched_by,
        )
        for membership in included:
            Task.objects.create(round=round_, site=membership.site)
            _ledger_append(
                membership, round_, LedgerKind.RESERVE, actor=launched_by, reason=f"round {number} launched"
            )
        _audit(
            "round.launched",
            actor=launched_by,
            federation=federation,
            round_=round_,
            mechanism=mechanism,
            params=cost.params,
            dp_event=cost.event,
            epsilon=str(round_.epsilon_per_site) if cost.has_guarantee else None,
            delta=federation.budget_delta,
            sites=[m.site.name for m in included],
            excluded=excluded,
        )
        _send_round_event(round_)
        for membership in included:
            events.send_on_commit(
                [events.site_group(membership.site_id)], {"type": "task.assigned", "round": round_.pk}
            )
    return round_


def _send_round_event(round_: Round) -> None:
    events.send_on_commit(
        [events.federation_group(round_.federation_id), events.round_group(round_.pk)]
        + [events.site_group(s) for s in round_.tasks.values_list("site_id", flat=True)],
        {
            "type": "round.state",
            "round": round_.pk,
            "number": round_.number,
            "state": round_.state,
            "reason": round_.failure_reason,
        },
    )


def _send_task_event(task: Task) -> None:
    round_ = task.round
    events.send_on_commit(
        events.site_scoped_groups(
            federation_id=round_.federation_id, round_id=round_.pk, site_id=task.site_id
        ),
        {
            "type": "task.state",
            "round": round_.pk,
            "task": task.pk,
            "site": task.site_id,
            "site_name": task.site.name,
            "state": task.state,
            "progress": task.progress,
            "reason": task.reason,
        },
    )


def _ledger_append(
    membership: Membership, round_: Round, kind: LedgerKind, **who_and_why: Any
) -> LedgerEntry:
    """One ledger row for ``round_``'s DP event, with that event's own epsilon at the budget's delta."""
    cost = RoundCost(round_.mechanism, round_.mechanism_params, round_.dp_event)
    return LedgerEntry.objects.create(
        membership=membership,
        round=round_,
        kind=kind,
        dp_event=round_.dp_event,
        epsilon=cost.epsilon_at(membership.budget_delta),
        mechanism=round_.mechanism,
        mechanism_params=round_.mechanism_params,
        **who_and_why,
    )


def _release_open_reservations(round_: Round, *, reason: str, site_ids: set[int] | None = None) -> None:
    for reservation in open_reservations(round_):
        if site_ids is not None and reservation.membership.site_id not in site_ids:
            continue
        _ledger_append(reservation.membership, round_, LedgerKind.RELEASE, reason=reason)


def _round_finish(round_: Round, *, state: RoundState, reason: str = "") -> None:
    """Move an open round to a final state, drop unfinished tasks, release unused reservations."""
    round_.state = state
    round_.finished_at = timezone.now()
    round_.failure_reason = reason
    round_.save(update_fields=["state", "finished_at", "failure_reason"])
    for task in round_.tasks.select_related("site").exclude(
        state__in=[TaskState.UPLOADED, TaskState.DROPPED]
    ):
        task.state = TaskState.DROPPED
        task.reason = reason or f"round {state}"
        task.updated_at = timezone.now()
        task.save(update_fields=["state", "reason", "updated_at"])
        _send_task_event(task)
    _release_open_reservations(round_, reason=f"round {state}" + (f": {reason}" if reason else ""))
    _send_round_event(round_)


def round_abort(*, round_: Round, aborted_by, reason: str) -> Round:
    reason = _require_reason(reason)
    with transaction.atomic():
        round_ = Round.objects.select_for_update().get(pk=round_.pk)
        if not round_.is_open:
            raise Conflict(f"{round_} is already {round_.state}")
        _round_finish(round_, state=RoundState.ABORTED, reason=reason)
        _audit("round.aborted", actor=aborted_by, federation=round_.federation, round_=round_, reason=reason)
    return round_


def round_fail(*, round_id: int, reason: str) -> Round:
    with transaction.atomic():
        round_ = Round.objects.select_for_update().get(pk=round_id)
        if round_.is_open:
            _round_finish(round_, state=RoundState.FAILED, reason=reason)
            _audit("round.failed", federation=round_.federation, round_=round_, reason=reason)
    return round_


def round_check_completion(*, round_id: int) -> str:
    """Start aggregation once every task is finished; fail the round when too few uploaded.

    Returns what happened: "waiting", "aggregating", "failed" or the round's final state.
    """
    with transaction.atomic():
        round_ = Round.objects.select_for_update().get(pk=round_id)
        if round_.state not in (RoundState.RESERVED, RoundState.TRAINING):
            return round_.state
        states = list(round_.tasks.values_list("state", flat=True))
        if any(s not in (TaskState.UPLOADED, TaskState.DROPPED) for s in states):
            return "waiting"
        accepted = Update.objects.filter(task__round=round_, status=UpdateStatus.ACCEPTED).count()
        if accepted < round_.min_sites:
            reason = f"only {accepted} accepted update(s), the round needs at least {round_.min_sites}"
            _round_finish(round_, state=RoundState.FAILED, reason=reason)
            _audit("round.failed", federation=round_.federation, round_=round_, reason=reason)
            return "failed"
        round_.state = RoundState.AGGREGATING
        round_.save(update_fields=["state"])
        _send_round_event(round_)
        _enqueue_aggregation(round_)
        return "aggregating"


def _enqueue_aggregation(round_: Round) -> None:
    """Queue the round's aggregation once this transaction commits.

    With Redis down the message cannot be sent; the state change stands, and the deadline
    check queues it again after AGGREGATION_REQUEUE_SECONDS (rounds_requeue_stalled_aggregations).
    """
    from coordinator.tasks import round_aggregate_task

    round_.aggregation_queued_at = timezone.now()
    round_.save(update_fields=["aggregation_queued_at"])
    round_id = round_.pk

    def send() -> None:
        try:
            round_aggregate_task.delay(round_id)
        except Exception as error:  # noqa: BLE001 - the broker is down; the requeue sweep retries
            log.warning(
                "could not queue the aggregation of round %s (%s); it will be queued again", round_id, error
            )

    transaction.on_commit(send)


def rounds_requeue_stalled_aggregations(*, now=None) -> list[int]:
    """Queue again the aggregation of rounds that have waited too long for their result."""
    now = now or timezone.now()
    stalled_since = now - timedelta(seconds=settings.AGGREGATION_REQUEUE_SECONDS)
    requeued = []
    for round_id in Round.objects.filter(
        state=RoundState.AGGREGATING, aggregation_queued_at__lte=stalled_since
    ).values_list("pk", flat=True):
        with transaction.atomic():
            round_ = Round.objects.select_for_update().get(pk=round_id)
            if round_.state == RoundState.AGGREGATING:
                _enqueue_aggregation(round_)
                requeued.append(round_id)
    return requeued


def rounds_enforce_deadlines(*, now=None) -> list[int]:
    """Drop the unfinished tasks of every open round past its deadline, then complete or fail it."""
    now = now or timezone.now()
    overdue = list(
        Round.objects.filter(
            state__in=[RoundState.RESERVED, RoundState.TRAINING], deadline__lte=now
        ).values_list("pk", flat=True)
    )
    for round_id in overdue:
        with transaction.atomic():
            round_ = Round.objects.select_for_update().get(pk=round_id)
            if round_.state not in (RoundState.RESERVED, RoundState.TRAINING):
                continue
            for task in round_.tasks.select_related("site", "round").exclude(
                state__in=[TaskState.UPLOADED, TaskState.DROPPED]
            ):
                _task_drop(task, reason="the round's deadline passed before this site uploaded")
        round_check_completion(round_id=round_id)
    return overdue


# ---------------------------------------------------------------------------------------------
# Tasks: what agents report

_TASK_ORDER = [TaskState.ASSIGNED, TaskState.EVALUATING, TaskState.TRAINING]


def _task_drop(task: Task, *, reason: str) -> None:
    task.state = TaskState.DROPPED
    task.reason = reason
    task.updated_at = timezone.now()
    task.save(update_fields=["state", "reason", "updated_at"])
    _release_open_reservations(task.round, reason=f"task dropped: {reason}", site_ids={task.site_id})
    _send_task_event(task)


def task_report(*, task: Task, state: str, progress: float | None = None, reason: str = "") -> Task:
    """An agent moves its task forward (assigned -> evaluating -> training), or drops it with a reason.

    Reporting the current state again is harmless (an agent resuming after a restart does it).
    """
    if state not in (*_TASK_ORDER, TaskState.DROPPED):
        raise InvalidInput(f"state must be one of evaluating, training or dropped, not {state!r}")
    if progress is not None and (not math.isfinite(progress) or not 0 <= progress <= 1):
        raise InvalidInput(f"progress must be between 0 and 1, not {progress}")
    with transaction.atomic():
        task = Task.objects.select_for_update().select_related("round", "site").get(pk=task.pk)
        if not task.round.is_open or task.state in (TaskState.UPLOADED, TaskState.DROPPED):
            raise Conflict(f"this task is already {task.state} (round {task.round.state})")
        if state == TaskState.DROPPED:
            _task_drop(task, reason=(reason or "dropped by the site").strip()[:1000])
            _audit(
                "task.dropped",
                actor_site=task.site,
                federation=task.round.federation,
                site=task.site,
                round_=task.round,
                reason=task.reason,
            )
        else:
            if _TASK_ORDER.index(TaskState(state)) < _TASK_ORDER.index(TaskState(task.state)):
                raise Conflict(f"this task is already {task.state}; it cannot go back to {state}")
            task.state = state
            if progress is not None:
                task.progress = progress
            task.updated_at = timezone.now()
            task.save(update_fields=["state", "progress", "updated_at"])
            _send_task_event(task)
            if task.round.state == RoundState.RESERVED and state != TaskState.ASSIGNED:
                task.round.state = RoundState.TRAINING
                task.round.save(update_fields=["state"])
                _send_round_event(task.round)
    if state == TaskState.DROPPED:
        round_check_completion(round_id=task.round_id)
    return task


def update_accept(*, task: Task, data: bytes) -> Update:
    """Store a site's update and commit the epsilon reserved for it, exactly once.

    A retried upload of the same bytes returns the stored update and commits nothing more.
    Bytes that are no update at all are refused with nothing stored, so the agent can retry.
    An update that decodes but breaks the round's rules (mechanism, sparsity, bounds) is
    recorded as rejected with its reason and sha256 for the audit, but its bytes are not kept
    (its path is empty: only accepted updates are stored), and its epsilon is committed all the
    same: its values left the site. The round goes on without it.
    """
    from coordinator.aggregation import UpdateRejected, validate_update
    from sitesagent.updates import UpdateError, decode_update

    digest = storage.sha256_of(data)
    existing = Update.objects.filter(task=task).first()
    if existing is not None:
        return _retried_upload(existing, digest)
    try:
        _check_takes_update(task)  # before decoding or storing anything
    except Conflict as closed:
        if _charge_late_upload(task, data):
            raise Conflict(
                f"{closed.message}; its epsilon is committed all the same: its values left the site"
            ) from None
        raise
    try:
        decoded = decode_update(data, max_bytes=settings.MAX_UPDATE_BYTES)
    except UpdateError as error:
        raise InvalidInput(f"the upload is not a valid update: {error}") from None

    round_ = task.round
    rejection = None
    try:
        validate_update(
            decoded,
            n_parameters=round_.base_version.n_parameters,
            mechanism=round_.mechanism,
            params=round_.mechanism_params,
        )
    except UpdateRejected as error:
        rejection = str(error)

    path = "" if rejection else storage.put("updates", data)[0]
    with _blob_kept_only_if_recorded(Update, path), transaction.atomic():
        task = Task.objects.select_for_update().select_related("round", "site").get(pk=task.pk)
        existing = Update.objects.filter(task=task).first()
        if existing is not None:
            return _retried_upload(existing, digest)
        _check_takes_update(task)
        update = Update.objects.create(
            task=task,
            path=path,
            sha256=digest,
            size_bytes=len(data),
            encoding=decoded.encoding,
            n_values=decoded.n_values,
            n_iterations=decoded.n_iterations,
            n_cases=decoded.n_cases,
            mechanism=decoded.mechanism,
            mechanism_params=decoded.params,
            status=UpdateStatus.REJECTED if rejection else UpdateStatus.ACCEPTED,
            rejection_reason=rejection or "",
        )
        _commit_spend(task, reason="update rejected: " + rejection if rejection else "update accepted")
        task.state = TaskState.DROPPED if rejection else TaskState.UPLOADED
        task.progress = 1.0
        task.reason = f"update rejected: {rejection}" if rejection else ""
        task.updated_at = timezone.now()
        task.save(update_fields=["state", "progress", "reason", "updated_at"])
        _send_task_event(task)
        if rejection:
            _audit(
                "update.rejected",
                actor_site=task.site,
                federation=task.round.federation,
                site=task.site,
                round_=task.round,
                reason=rejection,
            )
        transaction.on_commit(lambda: round_check_completion(round_id=task.round_id))
    if rejection:
        raise UpdateRejectedError(f"the update was rejected: {rejection}", details={"update": update.pk})
    return update


@contextlib.contextmanager
def _blob_kept_only_if_recorded(model: type[Update] | type[ModelVersion], path: str):
    """Blobs are written before the transaction that records them; if it fails, the blob goes
    too, unless an earlier row holds the same bytes (blobs are addressed by content)."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(DatabaseError):  # unsure whether it is recorded: keep it
            if path and not model.objects.filter(path=path).exists():
                storage.discard(path)
        raise


def _check_takes_update(task: Task) -> None:
    round_ = task.round
    if not round_.is_open or round_.state == RoundState.AGGREGATING or task.state == TaskState.DROPPED:
        raise Conflict(f"this task no longer takes an update (task {task.state}, round {round_.state})")


def _retried_upload(existing: Update, digest: str) -> Update:
    if existing.sha256 != digest:
        raise Conflict("this task already has a different update; an update is uploaded once")
    if existing.status == UpdateStatus.REJECTED:
        raise UpdateRejectedError(
            f"the update was rejected: {existing.rejection_reason}", details={"update": existing.pk}
        )
    return existing


def _commit_spend(task: Task, *, reason: str) -> None:
    """Commit the round's DP event for the task's site, once, whether or not a reservation is
    still open: whatever left the site is spent (a late upload included)."""
    membership = Membership.objects.get(federation_id=task.round.federation_id, site_id=task.site_id)
    if task.round.ledger.filter(membership=membership, kind=LedgerKind.COMMIT).exists():
        return
    try:
        with transaction.atomic():
            _ledger_append(membership, task.round, LedgerKind.COMMIT, actor_site=task.site, reason=reason)
    except IntegrityError:
        pass  # the unique (membership, round, kind) constraint: committed by a concurrent upload


def _charge_late_upload(task: Task, data: bytes) -> bool:
    """An update that arrives after its task closed is not used, but its values left the site:
    when it is an update for this round at all, the site's spend is committed all the same
    (the agent counts it too), and the refusal says so."""
    from sitesagent.updates import UpdateError, decode_update

    try:
        decoded = decode_update(data, max_bytes=settings.MAX_UPDATE_BYTES)
    except UpdateError:
        return False  # not an update: nothing was released
    if decoded.mechanism != task.round.mechanism:
        return False
    with transaction.atomic():
        task = Task.objects.select_for_update().select_related("round", "site").get(pk=task.pk)
        _commit_spend(task, reason="late upload: not used, but its values left the site")
        _audit(
            "update.late",
            actor_site=task.site,
            federation=task.round.federation,
            site=task.site,
            round_=task.round,
            reason=f"task {task.state}, round {task.round.state}",
        )
    return True


def metrics_record(*, task: Task, points: Any) -> int:
    """Store metric points an agent sent for its task, and forward them live.

    Only while the round is open and the task not dropped: an uploaded task's last points may
    still come from the agent's socket buffer, but a finished round's history is never rewritten.
    """
    _check_takes_metrics(task)
    if not isinstance(points, list):
        raise InvalidInput(f"points must be a list of metric points, not {type(points).__name__}")
    if len(points) > protocol.METRIC_POINTS_PER_MESSAGE:
        raise InvalidInput(
            f"too many metric points in one message: {len(points)}, the limit is "
            f"{protocol.METRIC_POINTS_PER_MESSAGE}; send them in smaller batches"
        )
    clean = []
    for point in points:
        if not isinstance(point, dict):
            raise InvalidInput(f"a metric point must be an object with a name, a value and a step: {point!r}")
        name = str(point.get("name", ""))[:64]
        try:
            value = float(point["value"])
            step = int(point.get("step", 0))
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(
                f"a metric point needs a name, a numeric value and an integer step: {point!r}"
            ) from None
        if not name or not math.isfinite(value):
            raise InvalidInput(
                f"metric {name or '(no name)'} needs a finite value, not {point.get('value')!r}"
            )
        clean.append(
            MetricPoint(
                federation_id=task.round.federation_id,
                round=task.round,
                site=task.site,
                name=name,
                step=step,
                value=value,
            )
        )
    # The last value for a step wins, within a batch and against what is stored: a re-sent batch
    # (its ack was lost) or a task trained again after a restart overwrites, never duplicates.
    clean = list({(p.name, p.step): p for p in clean}.values())
    MetricPoint.objects.bulk_create(
        clean,
        update_conflicts=True,
        unique_fields=["round", "site", "name", "step"],
        update_fields=["value", "created_at"],
    )
    events.send_now(
        events.site_scoped_groups(
            federation_id=task.round.federation_id, round_id=task.round_id, site_id=task.site_id
        ),
        {
            "type": "metrics",
            "round": task.round_id,
            "site": task.site_id,
            "site_name": task.site.name,
            "points": [{"name": p.name, "step": p.step, "value": p.value} for p in clean],
        },
    )
    return len(clean)


def _check_takes_metrics(task: Task) -> None:
    # Read now, not from ``task``: an agent socket keeps its tasks for its whole life.
    task_state, round_state = Task.objects.filter(pk=task.pk).values_list("state", "round__state").get()
    if round_state not in ROUND_OPEN_STATES:
        raise Conflict(f"round {task.round.number} is {round_state}: it takes no more metrics")
    if task_state == TaskState.DROPPED:
        raise Conflict("this task was dropped: it takes no more metrics")


# ---------------------------------------------------------------------------------------------
# Aggregation (run by a Celery worker)


class TransientAggregationError(Exception):
    """Worth retrying: a blob could not be read, the database was briefly unavailable."""


def _load_accepted_updates(round_: Round) -> list[tuple[Update, Any]]:
    from sitesagent.updates import decode_update

    loaded = []
    for update in Update.objects.filter(task__round=round_, status=UpdateStatus.ACCEPTED).select_related(
        "task__site"
    ):
        try:
            data = storage.get(update.path, expected_sha256=update.sha256)
        except FileNotFoundError as error:
            raise TransientAggregationError(f"the stored update {update.pk} is missing: {error}") from error
        loaded.append((update, decode_update(data)))
    return loaded


def _reject_at_aggregation(update: Update, reason: str) -> None:
    update.status = UpdateStatus.REJECTED
    update.rejection_reason = reason
    update.save(update_fields=["status", "rejection_reason"])
    _audit(
        "update.rejected",
        federation=update.task.round.federation,
        site=update.task.site,
        round_=update.task.round,
        reason=reason,
    )


def round_aggregate(*, round_id: int) -> str:
    """Aggregate a round's accepted updates into its one new model version.

    Safe to run twice, or again after a worker died mid-way: the arithmetic happens outside any
    lock, and only the run that finds the round still aggregating (under its row lock) stores
    the version; the version's one-to-one link to the round makes a second one impossible.
    """
    from coordinator.aggregation import UpdateRejected, aggregate, validate_update

    round_ = Round.objects.select_related("federation", "base_version").filter(pk=round_id).first()
    if round_ is None:
        return f"there is no round {round_id}"
    if round_.state != RoundState.AGGREGATING:
        return f"round already {round_.state}"
    federation = round_.federation
    base_state = weights.bytes_to_state(storage.get(round_.base_version.path, round_.base_version.sha256))
    usable = []
    for update, decoded in _load_accepted_updates(round_):
        try:
            validate_update(
                decoded,
                n_parameters=round_.base_version.n_parameters,
                mechanism=round_.mechanism,
                params=round_.mechanism_params,
            )
            usable.append(decoded)
        except UpdateRejected as error:
            with transaction.atomic():
                _reject_at_aggregation(update, str(error))
    if len(usable) < round_.min_sites:
        round_fail(
            round_id=round_id,
            reason=f"only {len(usable)} valid update(s) at aggregation, the round needs {round_.min_sites}",
        )
        return "failed"
    flat = aggregate(
        weights.flatten(base_state),
        usable,
        rule=federation.aggregation_rule,
        trim_fraction=federation.trim_fraction,
        norm_bound=federation.update_norm_bound,
        device=settings.AGGREGATION_DEVICE,
    )
    data = weights.state_to_bytes(weights.unflatten(flat, base_state))
    if settings.AGGREGATION_PAUSE_SECONDS:
        time.sleep(settings.AGGREGATION_PAUSE_SECONDS)
    return _round_store_result(round_id=round_id, data=data)


def _round_store_result(*, round_id: int, data: bytes) -> str:
    blob = storage.relative_path("versions", storage.sha256_of(data))
    with _blob_kept_only_if_recorded(ModelVersion, blob), transaction.atomic():
        round_ = Round.objects.select_for_update().select_related("federation").get(pk=round_id)
        if round_.state != RoundState.AGGREGATING or ModelVersion.objects.filter(produced_by=round_).exists():
            return f"round already {round_.state}"
        version = model_version_store(
            federation=round_.federation, data=data, base=round_.base_version, produced_by=round_
        )
        round_.state = RoundState.DONE
        round_.finished_at = timezone.now()
        round_.save(update_fields=["state", "finished_at"])
        _release_open_reservations(round_, reason="round done")
        _send_round_event(round_)
        events.send_on_commit(
            [events.federation_group(round_.federation_id), events.round_group(round_.pk)],
            {"type": "version.created", "round": round_.pk, "version": version.pk, "number": version.number},
        )
        _launch_next_if_back_to_back(round_)
    return f"version {version.number}"


def _launch_next_if_back_to_back(round_: Round) -> None:
    federation = Federation.objects.select_for_update().get(pk=round_.federation_id)
    if federation.auto_rounds_remaining < 1:
        return
    federation.auto_rounds_remaining -= 1
    federation.save(update_fields=["auto_rounds_remaining"])
    sites = list(round_.tasks.values_list("site_id", flat=True))
    params = dict(
        federation=federation,
        launched_by=round_.launched_by,
        site_ids=sites,
        mechanism=round_.mechanism,
        mechanism_params=round_.mechanism_params,
        training_params=round_.training_params,
    )

    def launch() -> None:
        try:
            round_launch(**params)
        except LaunchRefused as error:
            _audit("rounds.back_to_back_stopped", federation=federation, reason=error.message)

    transaction.on_commit(launch)


def federation_run_rounds(*, federation: Federation, count: int, started_by, **launch: Any) -> Round:
    """Launch a round now and ``count - 1`` more, each as soon as the one before it is done."""
    if count < 1:
        raise InvalidInput(f"count must be at least 1, not {count}")
    with transaction.atomic():
        federation.auto_rounds_remaining = count - 1
        federation.save(update_fields=["auto_rounds_remaining"])
        _audit("rounds.back_to_back", actor=started_by, federation=federation, count=count)
        return round_launch(federation=federation, launched_by=started_by, **launch)
