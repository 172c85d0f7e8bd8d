"""Reads only the dashboard needs. Callers pass what access.* allows; nothing here decides it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from django.db.models import Count, Q, QuerySet

from coordinator import accounting, selectors
from coordinator.models import (
    AuditEvent,
    Federation,
    LedgerEntry,
    LedgerKind,
    Membership,
    MetricPoint,
    ModelVersion,
    Round,
    Site,
    Task,
    Update,
)
from sitesagent import protocol

NO_GUARANTEE = "no formal guarantee"


def epsilon_text(value: Decimal | None) -> str:
    """An exact epsilon as people read it (1, 0.25), or the words for a round without one."""
    if value is None:
        return NO_GUARANTEE
    return format(value.normalize(), "f")


def _visible(queryset: QuerySet, site_ids: set[int] | None, field: str = "site_id") -> QuerySet:
    return queryset if site_ids is None else queryset.filter(**{f"{field}__in": site_ids})


# --- Federation overview ----------------------------------------------------------------------


def rounds_of(federation: Federation) -> list[Any]:
    """Newest first, each with ``n_tasks`` and ``result`` (the model version it produced, or None)."""
    rounds = list(
        federation.rounds.select_related("launched_by", "base_version")
        .annotate(n_tasks=Count("tasks"))
        .order_by("-number")
    )
    results = result_versions(federation)
    for round_ in rounds:
        round_.result = results.get(round_.pk)  # type: ignore[attr-defined]  # a template-only attribute
    return rounds


def result_versions(federation: Federation) -> dict[int, ModelVersion]:
    """Model versions keyed by the id of the round that produced them."""
    return {
        v.produced_by_id: v for v in federation.versions.filter(produced_by__isnull=False) if v.produced_by_id
    }


def versions_of(federation: Federation) -> list[ModelVersion]:
    return list(federation.versions.select_related("base", "produced_by").order_by("-number"))


def site_case_counts(sites: Iterable[Site]) -> dict[int, int | None]:
    """What each agent last said about its number of cases."""
    return {site.pk: selectors.case_count(site.agent_info) for site in sites}


def epsilon_commits(memberships: Iterable[Membership]) -> list[dict[str, Any]]:
    """Commit entries of these memberships in ledger order, each with the site's epsilon right
    after it: the accountant's figure over its commits so far, at its budget's delta (``spent``).
    A round with no formal guarantee has ``protected`` False and leaves ``spent`` where it was."""
    memberships = list(memberships)
    deltas = {m.pk: m.budget_delta for m in memberships}
    so_far: dict[int, list[dict | None]] = {m.pk: [] for m in memberships}
    rows = []
    entries = LedgerEntry.objects.filter(membership__in=memberships, kind=LedgerKind.COMMIT)
    for entry in entries.select_related("round", "membership__site").order_by("id"):
        events = so_far[entry.membership_id]
        events.append(entry.dp_event)
        spent = accounting.composition_figures(events, deltas[entry.membership_id]).accountant_epsilon
        rows.append(
            {
                "round": entry.round.number,
                "site": entry.membership.site.name,
                "spent": spent,
                "protected": entry.dp_event is not None,
            }
        )
    return rows


# --- Sites --------------------------------------------------------------------------------------


def device_kind(info: dict[str, Any]) -> str | None:
    device = str((info or {}).get("device") or "")
    if not device:
        return None
    return "GPU" if device.startswith(("cuda", "gpu", "mps")) else "CPU"


# What a data check reports (sitesagent.data.DataCheck.to_dict), in the order a page shows it.
DATA_CHECK_FACTS = ("n_cases", "shapes", "spacings", "orientations", "cases_with_region", "label_voxels")


def data_check_summary(info: dict[str, Any]) -> dict[str, Any] | None:
    """What the agent's data check found, for a page: ok, problems, and the facts it reported.

    Agents send problem counts, not messages (those name files, and so may name patients);
    messages are shown when an agent sends them anyway.
    """
    check = (info or {}).get("data_check")
    if check is None:
        return None
    if not isinstance(check, dict):
        return {"ok": None, "problems": [], "facts": [("summary", str(check))]}
    problems = check.get("problems") or check.get("errors") or []
    if isinstance(problems, str):
        problems = [problems]
    problems = [str(p) for p in problems]
    n_problems = check.get("n_problems")
    if not problems and isinstance(n_problems, int) and n_problems > 0:
        problems = [f"{n_problems} case(s) failed the check (the details stay at the site)"]
    ok = check.get("ok")
    if ok is None:
        ok = not problems
    keys = [k for k in DATA_CHECK_FACTS if k in check] + sorted(
        k for k in check if k not in DATA_CHECK_FACTS and k not in ("ok", "problems", "errors", "n_problems")
    )
    facts = [(key.replace("_", " "), _fact(check[key])) for key in keys]
    return {"ok": bool(ok), "problems": problems, "facts": facts}


def _fact(value: Any) -> str:
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, list) and all(isinstance(v, list) for v in value):
        return "; ".join(" × ".join(str(x) for x in v) for v in value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ", ".join(str(v) for v in value)
    return json.dumps(value)


def site_rows(sites: Iterable[Site], federation_ids: set[int]) -> list[dict[str, Any]]:
    """What the sites page shows of each site; only the federations in ``federation_ids`` are named."""
    return [
        {
            "site": site,
            "device": device_kind(site.agent_info),
            "device_name": (site.agent_info or {}).get("device"),
            "cases": selectors.case_count(site.agent_info),
            "check": data_check_summary(site.agent_info),
            "federations": [
                m.federation for m in site.memberships.all() if m.federation_id in federation_ids
            ],
        }
        for site in sites
    ]


def agent_policy(info: dict[str, Any] | None) -> list[tuple[str, str]] | None:
    """The site's own rules as its agent last reported them, as (rule, setting) rows for people."""
    policy = (info or {}).get("policy")
    if not isinstance(policy, dict):
        return None

    def listed(value: Any, default: str) -> str:
        return ", ".join(map(str, value)) if isinstance(value, list) else default

    def limit(value: Any) -> str:
        return (
            f"epsilon {value:g}" if isinstance(value, int | float) and not isinstance(value, bool) else "none"
        )

    return [
        ("Federations served", listed(policy.get("federations"), "every one the site accepted")),
        ("Mechanisms accepted", listed(policy.get("mechanisms"), "every protected one")),
        ("Cap over all rounds", limit(policy.get("max_epsilon"))),
        ("Cap per round", limit(policy.get("max_round_epsilon"))),
        ("At delta", str(policy.get("delta", "–"))),
        ("Unprotected sharing", "allowed" if policy.get("allow_unprotected") is True else "refused"),
    ]


def site_tasks(site: Site, federation_ids: Iterable[int], limit: int = 50) -> list[Task]:
    return list(
        Task.objects.filter(site=site, round__federation_id__in=list(federation_ids))
        .select_related("round__federation")
        .order_by("-round__launched_at")[:limit]
    )


# --- Budgets ------------------------------------------------------------------------------------


def budget_rows(memberships: Iterable[Membership]) -> list[dict[str, Any]]:
    memberships = list(memberships)
    balances = accounting.balances_for(memberships)
    return [
        {
            "membership": m,
            "site": m.site.name,
            "balance": balances[m.pk],
            "budget": balances[m.pk].budget,
            "committed": balances[m.pk].committed,
            "reserved": balances[m.pk].reserved,
            "remaining": balances[m.pk].remaining,
        }
        for m in sorted(memberships, key=lambda m: m.site.name)
    ]


# --- Live round ---------------------------------------------------------------------------------


def round_series(round_: Round, tasks: list[Task], metric: str) -> list[dict[str, Any]]:
    points: dict[int, list[tuple[int, float]]] = {task.site_id: [] for task in tasks}
    for site_id, step, value in (
        MetricPoint.objects.filter(round=round_, name=metric, site_id__in=list(points))
        .order_by("step", "id")
        .values_list("site_id", "step", "value")
    ):
        points[site_id].append((step, value))
    return [
        {"site_id": task.site_id, "site": task.site.name, "points": points[task.site_id]} for task in tasks
    ]


def latest_values(
    round_: Round, site_ids: Iterable[int], names: Iterable[str]
) -> dict[int, dict[str, float]]:
    """Each site's most recent value of each metric in this round."""
    latest: dict[int, dict[str, float]] = {}
    for site_id, name, value in (
        MetricPoint.objects.filter(round=round_, site_id__in=list(site_ids), name__in=list(names))
        .order_by("id")
        .values_list("site_id", "name", "value")
    ):
        latest.setdefault(site_id, {})[name] = value
    return latest


def round_task_rows(round_: Round, tasks: list[Task]) -> list[dict[str, Any]]:
    updates = {u.task_id: u for u in Update.objects.filter(task__in=tasks)}
    latest = latest_values(
        round_, [t.site_id for t in tasks], [*protocol.METRIC_DICE, "train_loss", "throughput"]
    )
    rows = []
    for task in tasks:
        update = updates.get(task.pk)
        values = latest.get(task.site_id, {})
        rows.append(
            {
                "task": task,
                "update": update,
                "cases": (update.n_cases if update else None) or selectors.case_count(task.site.agent_info),
                "dice": {name: values.get(name) for name in protocol.METRIC_DICE},
                "loss": values.get("train_loss"),
                "throughput": values.get("throughput"),
            }
        )
    return rows


def federated_row(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The case-weighted Dice across the rows that reported it."""
    result: dict[str, float | None] = {}
    for name in protocol.METRIC_DICE:
        reported = [(row["cases"] or 1, row["dice"][name]) for row in rows if row["dice"][name] is not None]
        weight = sum(w for w, _ in reported)
        result[name] = sum(w * v for w, v in reported) / weight if weight else None
    return result


# --- Privacy audit ------------------------------------------------------------------------------


def ledger_rows(
    memberships: Iterable[Membership],
    *,
    site_id: int | None = None,
    round_number: int | None = None,
    kind: str | None = None,
) -> list[dict[str, Any]]:
    """Ledger entries with the balance right after each; filters never change those balances."""
    memberships = list(memberships)
    entries = (
        LedgerEntry.objects.filter(membership__in=memberships)
        .select_related(
            "membership__site", "membership__federation", "round__launched_by", "actor", "actor_site"
        )
        .order_by("id")
    )
    rows = accounting.ledger_with_balances(entries, memberships)
    return [
        row
        for row in rows
        if (site_id is None or row["entry"].membership.site_id == site_id)
        and (round_number is None or row["entry"].round.number == round_number)
        and (kind is None or row["entry"].kind == kind)
    ]


def composition_rows(memberships: Iterable[Membership]) -> list[dict[str, Any]]:
    """Per site: its committed DP events composed by the accountant at its budget's delta."""
    memberships = sorted(memberships, key=lambda m: m.site.name)
    committed: dict[int, list[dict | None]] = {m.pk: [] for m in memberships}
    for membership_id, event in (
        LedgerEntry.objects.filter(membership__in=memberships, kind=LedgerKind.COMMIT)
        .order_by("id")
        .values_list("membership_id", "dp_event")
    ):
        committed[membership_id].append(event)
    return [
        {
            "membership": m,
            "site": m.site.name,
            "committed": accounting.as_decimal(figures.accountant_epsilon),
            "figures": figures,
            "events": [event for event in committed[m.pk] if event is not None],
        }
        for m in memberships
        for figures in [accounting.composition_figures(committed[m.pk], m.budget_delta)]
    ]


EXPORT_FIELDS = [
    "id",
    "created_at",
    "federation",
    "site",
    "round",
    "kind",
    "mechanism",
    "mechanism_params",
    "dp_event",
    "epsilon",
    "delta",
    "guarantee",
    "launched_by",
    "launched_at",
    "caused_by",
    "reason",
    "budget_after",
    "committed_after",
    "reserved_after",
    "remaining_after",
    "unprotected_rounds_after",
]


def ledger_export(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ledger rows for CSV and JSON: epsilons as exact decimal strings, None for no guarantee."""
    exported = []
    for row in rows:
        entry, balance = row["entry"], row["balance"]
        caused_by = entry.actor or entry.actor_site
        exported.append(
            {
                "id": entry.pk,
                "created_at": entry.created_at.isoformat(),
                "federation": entry.membership.federation.name,
                "site": entry.membership.site.name,
                "round": entry.round.number,
                "kind": entry.kind,
                "mechanism": entry.mechanism,
                "mechanism_params": entry.mechanism_params,
                "dp_event": entry.dp_event,
                "epsilon": None if entry.epsilon is None else str(entry.epsilon),
                "delta": entry.membership.budget_delta,
                "guarantee": protocol.mechanism_spec(entry.mechanism).guarantee or NO_GUARANTEE,
                "launched_by": entry.round.launched_by.get_username() if entry.round.launched_by else None,
                "launched_at": entry.round.launched_at.isoformat(),
                "caused_by": str(caused_by) if caused_by else "coordinator",
                "reason": entry.reason,
                "budget_after": str(balance.budget),
                "committed_after": str(balance.committed),
                "reserved_after": str(balance.reserved),
                "remaining_after": str(balance.remaining),
                "unprotected_rounds_after": balance.unprotected_rounds,
            }
        )
    return exported


# --- Audit log ----------------------------------------------------------------------------------


def audit_events(federation: Federation, *, action: str | None = None) -> QuerySet[AuditEvent]:
    """The federation's events, and those about its sites that belong to no federation (tokens)."""
    site_ids = federation.memberships.values_list("site_id", flat=True)
    events = AuditEvent.objects.filter(
        Q(federation=federation) | Q(federation__isnull=True, site_id__in=site_ids)
    ).select_related("actor", "actor_site", "site", "round")
    if action:
        events = events.filter(action=action)
    return events.order_by("-id")


def audit_actions(federation: Federation) -> list[str]:
    return sorted(set(audit_events(federation).values_list("action", flat=True)))
