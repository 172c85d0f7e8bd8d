"""The domain's data: fields, choices, and cheap derived values. State changes live in services.py."""

from __future__ import annotations

import hashlib
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.utils import timezone

from sitesagent import protocol

# Epsilon is stored as an exact decimal so that sums over the ledger never drift.
EPSILON_MAX_DIGITS = 24
EPSILON_PLACES = 12
EPSILON_QUANTUM = Decimal("0.000000000001")


def token_hash(token: str) -> str:
    """Tokens are 256-bit random strings, so one SHA-256 is enough to store them safely."""
    return hashlib.sha256(token.encode()).hexdigest()


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):  # noqa: ARG002
        raise TypeError(f"{self.model.__name__} is append-only: rows are never updated")

    def delete(self):
        raise TypeError(f"{self.model.__name__} is append-only: rows are never deleted")


class AppendOnlyModel(models.Model):
    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True

    def save(self, *args, **kwargs):
        if self.pk is not None and not self._state.adding:
            raise TypeError(f"{type(self).__name__} is append-only: rows are never updated")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is append-only: rows are never deleted")


# The delta a new federation states its budgets at: below 1/N for any federation of fewer than
# 100,000 patients, the usual rule for record-level DP.
DEFAULT_BUDGET_DELTA = 1e-5


class Mechanism(models.TextChoices):
    NONE = protocol.MECHANISM_NONE, protocol.MECHANISM_REGISTRY[protocol.MECHANISM_NONE].label
    PARTIAL = protocol.MECHANISM_PARTIAL, protocol.MECHANISM_REGISTRY[protocol.MECHANISM_PARTIAL].label
    SVT = protocol.MECHANISM_SVT, protocol.MECHANISM_REGISTRY[protocol.MECHANISM_SVT].label
    DPSGD = protocol.MECHANISM_DPSGD, protocol.MECHANISM_REGISTRY[protocol.MECHANISM_DPSGD].label


class AggregationRule(models.TextChoices):
    MEAN = "mean", "Weighted mean (FedAvg)"
    MEDIAN = "median", "Coordinate-wise median"
    TRIMMED_MEAN = "trimmed_mean", "Trimmed mean"


class Federation(models.Model):
    name = models.CharField(max_length=120, unique=True)
    description = models.TextField(blank=True)
    # The model: SegResNet settings (sitesagent.model.ModelConfig) and its initial seed.
    model_config = models.JSONField(default=dict)
    model_seed = models.IntegerField(default=0)
    # Defaults a launch starts from.
    training_defaults = models.JSONField(default=dict)
    default_mechanism = models.CharField(max_length=16, choices=Mechanism.choices, default=Mechanism.DPSGD)
    default_mechanism_params = models.JSONField(default=dict)
    # The delta new memberships' budgets are stated at: each budget is (epsilon, delta).
    budget_delta = models.FloatField(default=DEFAULT_BUDGET_DELTA)
    min_sites = models.PositiveIntegerField(default=1)
    round_deadline_seconds = models.PositiveIntegerField(default=3600)
    aggregation_rule = models.CharField(
        max_length=16, choices=AggregationRule.choices, default=AggregationRule.MEAN
    )
    trim_fraction = models.FloatField(default=0.1)
    update_norm_bound = models.FloatField(null=True, blank=True)
    # Back to back: how many more rounds to launch automatically after each one finishes.
    auto_rounds_remaining = models.PositiveIntegerField(default=0)
    coordinators = models.ManyToManyField(
        settings.AUTH_USER_MODEL, related_name="coordinated_federations", blank=True
    )
    auditors = models.ManyToManyField(
        settings.AUTH_USER_MODEL, related_name="audited_federations", blank=True
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name

    def latest_version(self) -> ModelVersion | None:
        return self.versions.order_by("-number").first()


class Site(models.Model):
    name = models.CharField(max_length=120, unique=True)
    token_hash = models.CharField(max_length=64, unique=True)
    token_rotated_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    admins = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="administered_sites", blank=True)
    # What the agent last told us about itself: device, case count, data check summary.
    last_seen_at = models.DateTimeField(null=True, blank=True)
    agent_info = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def is_online(self) -> bool:
        if self.last_seen_at is None:
            return False
        return (timezone.now() - self.last_seen_at).total_seconds() < settings.SITE_ONLINE_SECONDS


class MembershipStatus(models.TextChoices):
    INVITED = "invited"
    ACCEPTED = "accepted"
    LEFT = "left"


class Membership(models.Model):
    """A site in a federation, with its privacy budget: epsilon over all rounds, at budget_delta.

    The accountant (coordinator.accounting) composes the site's DP events at budget_delta; the
    composed epsilon may never pass budget_epsilon. Delta 0 means pure DP (SVT rounds only).

    A coordinator's adding a site is an invitation; the site takes part (gets tasks, has epsilon
    reserved) only once its admins accept it, and until it leaves. A membership is never deleted:
    its ledger stays with it.
    """

    federation = models.ForeignKey(Federation, on_delete=models.PROTECT, related_name="memberships")
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="memberships")
    budget_epsilon = models.DecimalField(max_digits=EPSILON_MAX_DIGITS, decimal_places=EPSILON_PLACES)
    budget_delta = models.FloatField(default=DEFAULT_BUDGET_DELTA)
    allows_unprotected_sharing = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    left_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["federation", "site"], name="one_membership_per_site")]

    def __str__(self) -> str:
        return f"{self.site} in {self.federation}"

    @property
    def status(self) -> MembershipStatus:
        if self.left_at is not None:
            return MembershipStatus.LEFT
        return MembershipStatus.INVITED if self.accepted_at is None else MembershipStatus.ACCEPTED

    @property
    def is_active(self) -> bool:
        """Accepted and not left: the site takes part in this federation's rounds."""
        return self.status == MembershipStatus.ACCEPTED


# Memberships through which a site takes part (a filter on Membership).
ACTIVE_MEMBERSHIP = models.Q(accepted_at__isnull=False, left_at__isnull=True)


class ModelVersion(models.Model):
    """Immutable weights (a safetensors file in STORAGE_DIR) and where they came from."""

    federation = models.ForeignKey(Federation, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    base = models.ForeignKey("self", on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    produced_by = models.OneToOneField(
        "Round", on_delete=models.PROTECT, null=True, blank=True, related_name="result_version"
    )
    path = models.CharField(max_length=500)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField()
    n_parameters = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["federation", "number"], name="one_version_number")]

    def __str__(self) -> str:
        return f"{self.federation} v{self.number}"


class RoundState(models.TextChoices):
    RESERVED = "reserved"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    DONE = "done"
    FAILED = "failed"
    ABORTED = "aborted"


ROUND_OPEN_STATES = (RoundState.RESERVED, RoundState.TRAINING, RoundState.AGGREGATING)


class Round(models.Model):
    federation = models.ForeignKey(Federation, on_delete=models.PROTECT, related_name="rounds")
    number = models.PositiveIntegerField()
    base_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="rounds_based_on")
    state = models.CharField(max_length=16, choices=RoundState.choices, default=RoundState.RESERVED)
    # Frozen at launch: what the agents apply and what the ledger records.
    mechanism = models.CharField(max_length=16, choices=Mechanism.choices)
    mechanism_params = models.JSONField(default=dict)
    # The DP event each site's part of the round is (protocol.round_event); null means "no formal
    # guarantee" (none, partial sharing), never a made-up number.
    dp_event = models.JSONField(null=True, blank=True)
    # The round's own epsilon at the federation's budget delta, for people; the ledger composes
    # dp_event at each membership's own delta.
    epsilon_per_site = models.DecimalField(
        max_digits=EPSILON_MAX_DIGITS, decimal_places=EPSILON_PLACES, null=True, blank=True
    )
    training_params = models.JSONField(default=dict)
    min_sites = models.PositiveIntegerField()
    deadline = models.DateTimeField()
    excluded_sites = models.JSONField(default=list, blank=True)
    launched_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, related_name="+"
    )
    launched_at = models.DateTimeField(default=timezone.now)
    # When its aggregation was last queued: a queued message can be lost with Redis's memory.
    aggregation_queued_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["federation", "number"], name="one_round_number")]

    def __str__(self) -> str:
        return f"{self.federation} round {self.number}"

    @property
    def is_open(self) -> bool:
        return self.state in ROUND_OPEN_STATES

    @property
    def has_formal_guarantee(self) -> bool:
        return self.epsilon_per_site is not None


class TaskState(models.TextChoices):
    ASSIGNED = protocol.TASK_ASSIGNED
    EVALUATING = protocol.TASK_EVALUATING
    TRAINING = protocol.TASK_TRAINING
    UPLOADED = protocol.TASK_UPLOADED
    DROPPED = protocol.TASK_DROPPED


class Task(models.Model):
    round = models.ForeignKey(Round, on_delete=models.PROTECT, related_name="tasks")
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="tasks")
    state = models.CharField(max_length=16, choices=TaskState.choices, default=TaskState.ASSIGNED)
    progress = models.FloatField(default=0.0)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["round", "site"], name="one_task_per_site")]

    def __str__(self) -> str:
        return f"{self.round} / {self.site}"


class UpdateStatus(models.TextChoices):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class Update(models.Model):
    task = models.OneToOneField(Task, on_delete=models.PROTECT, related_name="update")
    path = models.CharField(max_length=500)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.BigIntegerField()
    encoding = models.CharField(max_length=8)
    n_values = models.BigIntegerField()
    n_iterations = models.PositiveIntegerField()
    n_cases = models.PositiveIntegerField()
    mechanism = models.CharField(max_length=16, choices=Mechanism.choices)
    mechanism_params = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=UpdateStatus.choices, default=UpdateStatus.ACCEPTED)
    rejection_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"update for {self.task} ({self.status})"


class LedgerKind(models.TextChoices):
    RESERVE = "reserve"
    COMMIT = "commit"
    RELEASE = "release"


class LedgerEntry(AppendOnlyModel):
    """One privacy-budget event for one site. Balances are composed from these rows, never stored."""

    membership = models.ForeignKey(Membership, on_delete=models.PROTECT, related_name="ledger")
    round = models.ForeignKey(Round, on_delete=models.PROTECT, related_name="ledger")
    kind = models.CharField(max_length=8, choices=LedgerKind.choices)
    # The round's DP event, which the accountant composes; null means "no formal guarantee".
    dp_event = models.JSONField(null=True, blank=True)
    # That event's own epsilon at the membership's budget delta, for people reading the row.
    epsilon = models.DecimalField(
        max_digits=EPSILON_MAX_DIGITS, decimal_places=EPSILON_PLACES, null=True, blank=True
    )
    mechanism = models.CharField(max_length=16, choices=Mechanism.choices)
    mechanism_params = models.JSONField(default=dict)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, related_name="+")
    actor_site = models.ForeignKey(Site, on_delete=models.PROTECT, null=True, related_name="+")
    reason = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "ledger entries"
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["membership", "round", "kind"], name="one_ledger_kind_per_round"),
        ]

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.epsilon if self.epsilon is not None else 'no guarantee'} ({self.membership})"
        )


class MetricPoint(models.Model):
    federation = models.ForeignKey(Federation, on_delete=models.CASCADE, related_name="metrics")
    round = models.ForeignKey(Round, on_delete=models.CASCADE, null=True, blank=True, related_name="metrics")
    site = models.ForeignKey(Site, on_delete=models.CASCADE, null=True, blank=True, related_name="metrics")
    name = models.CharField(max_length=64)
    step = models.IntegerField(default=0)
    value = models.FloatField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        # One value per step: an agent re-sending a batch whose ack it never got (after a
        # dropped socket) overwrites rather than duplicates.
        constraints = [
            models.UniqueConstraint(
                fields=["round", "site", "name", "step"], name="one_metric_value_per_step"
            )
        ]

    def __str__(self) -> str:
        return f"{self.name}[{self.step}] = {self.value:g}"


class AuditEvent(AppendOnlyModel):
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, related_name="+")
    actor_site = models.ForeignKey(Site, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    action = models.CharField(max_length=64)
    federation = models.ForeignKey(
        Federation, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    site = models.ForeignKey(Site, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    round = models.ForeignKey(Round, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    reason = models.TextField(blank=True)
    details = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M} {self.action}"


class PersonalToken(models.Model):
    """A coordinator's API token (Authorization: Bearer user_...), stored only as a hash."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.user})"
