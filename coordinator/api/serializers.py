"""Shapes of the API's requests and responses (they also make the OpenAPI schema)."""

from __future__ import annotations

from rest_framework import serializers

from coordinator import access, models
from sitesagent import protocol


class FederationSerializer(serializers.ModelSerializer):
    latest_version = serializers.SerializerMethodField()

    class Meta:
        model = models.Federation
        fields = [
            "id",
            "name",
            "description",
            "model_config",
            "model_seed",
            "training_defaults",
            "default_mechanism",
            "default_mechanism_params",
            "min_sites",
            "round_deadline_seconds",
            "aggregation_rule",
            "trim_fraction",
            "update_norm_bound",
            "auto_rounds_remaining",
            "created_at",
            "latest_version",
        ]
        read_only_fields = ["id", "created_at", "latest_version", "model_config", "model_seed"]

    def get_latest_version(self, federation) -> int | None:
        version = federation.latest_version()
        return version.pk if version else None


class FederationCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=120)
    model_config = serializers.JSONField(required=False)
    model_seed = serializers.IntegerField(required=False, default=0)
    min_sites = serializers.IntegerField(required=False, default=1, min_value=1)
    round_deadline_seconds = serializers.IntegerField(required=False, default=3600, min_value=1)
    default_mechanism = serializers.ChoiceField(
        choices=models.Mechanism.choices, required=False, default=protocol.MECHANISM_DPSGD
    )
    default_mechanism_params = serializers.JSONField(required=False)
    budget_delta = serializers.FloatField(
        required=False,
        default=models.DEFAULT_BUDGET_DELTA,
        min_value=0.0,
        max_value=0.5,
        help_text="the delta every site's budget is stated at (0: pure DP, SVT rounds only)",
    )
    training_defaults = serializers.JSONField(required=False)
    aggregation_rule = serializers.ChoiceField(
        choices=models.AggregationRule.values, required=False, default="mean"
    )
    trim_fraction = serializers.FloatField(required=False, default=0.1, min_value=0.0, max_value=0.49)
    update_norm_bound = serializers.FloatField(required=False, allow_null=True, default=None, min_value=0.0)


class SiteSerializer(serializers.ModelSerializer):
    is_online = serializers.BooleanField(read_only=True)
    is_revoked = serializers.BooleanField(read_only=True)

    class Meta:
        model = models.Site
        fields = [
            "id",
            "name",
            "created_at",
            "token_rotated_at",
            "revoked_at",
            "is_revoked",
            "last_seen_at",
            "is_online",
            "agent_info",
        ]


class SiteWithTokenSerializer(serializers.Serializer):
    site = SiteSerializer()
    token = serializers.CharField(help_text="Shown this once; stored only as a hash.")


class NameSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=120)


class ReasonSerializer(serializers.Serializer):
    reason = serializers.CharField(max_length=1000, required=False, allow_blank=True, default="")


class BalanceSerializer(serializers.Serializer):
    budget = serializers.CharField()
    committed = serializers.CharField()
    reserved = serializers.CharField()
    remaining = serializers.CharField()
    unprotected_rounds = serializers.IntegerField()


class MembershipSerializer(serializers.ModelSerializer):
    site_name = serializers.CharField(source="site.name", read_only=True)
    status = serializers.ChoiceField(choices=models.MembershipStatus.choices, read_only=True)
    balance = serializers.SerializerMethodField()

    class Meta:
        model = models.Membership
        fields = [
            "id",
            "federation",
            "site",
            "site_name",
            "status",
            "accepted_at",
            "left_at",
            "budget_epsilon",
            "allows_unprotected_sharing",
            "balance",
        ]

    def get_balance(self, membership) -> dict:
        balances = self.context.get("balances") or {}
        balance = balances.get(membership.pk)
        return balance.as_dict() if balance else {}


class MembershipCreateSerializer(serializers.Serializer):
    site = serializers.IntegerField()
    budget = serializers.JSONField(help_text="Total epsilon for this site over all rounds.")
    allows_unprotected_sharing = serializers.BooleanField(required=False, default=False)
    reason = serializers.CharField(max_length=1000)


class BudgetChangeSerializer(serializers.Serializer):
    budget = serializers.JSONField()
    allows_unprotected_sharing = serializers.BooleanField(required=False, allow_null=True, default=None)
    reason = serializers.CharField(max_length=1000)


class TaskSerializer(serializers.ModelSerializer):
    site_name = serializers.CharField(source="site.name", read_only=True)
    update_status = serializers.SerializerMethodField()

    class Meta:
        model = models.Task
        fields = [
            "id",
            "round",
            "site",
            "site_name",
            "state",
            "progress",
            "reason",
            "updated_at",
            "update_status",
        ]

    def get_update_status(self, task) -> dict | None:
        update = getattr(task, "update", None) if hasattr(task, "update") else None
        if update is None:
            return None
        return {
            "status": update.status,
            "reason": update.rejection_reason,
            "n_values": update.n_values,
            "n_iterations": update.n_iterations,
            "n_cases": update.n_cases,
        }


class RoundSerializer(serializers.ModelSerializer):
    result_version = serializers.SerializerMethodField()
    excluded_sites = serializers.SerializerMethodField()

    class Meta:
        model = models.Round
        fields = [
            "id",
            "federation",
            "number",
            "state",
            "base_version",
            "result_version",
            "mechanism",
            "mechanism_params",
            "epsilon_per_site",
            "training_params",
            "min_sites",
            "deadline",
            "excluded_sites",
            "launched_by",
            "launched_at",
            "finished_at",
            "failure_reason",
        ]

    def get_result_version(self, round_) -> int | None:
        version = models.ModelVersion.objects.filter(produced_by=round_).first()
        return version.pk if version else None

    def get_excluded_sites(self, round_) -> list[dict]:
        """Why sites were left out names their balances: each viewer sees only the sites they may."""
        return access.excluded_sites_visible_to(self.context.get("user"), round_)


class RoundLaunchSerializer(serializers.Serializer):
    sites = serializers.ListField(
        child=serializers.IntegerField(), required=False, allow_null=True, default=None
    )
    mechanism = serializers.ChoiceField(
        choices=models.Mechanism.choices, required=False, allow_null=True, default=None
    )
    mechanism_params = serializers.JSONField(required=False, allow_null=True, default=None)
    training_params = serializers.JSONField(required=False, allow_null=True, default=None)
    deadline_seconds = serializers.IntegerField(required=False, allow_null=True, default=None)
    min_sites = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1)
    confirm_noise = serializers.BooleanField(
        required=False,
        default=False,
        help_text="launch even though the preview says the updates would be mostly noise",
    )


class ModelVersionSerializer(serializers.ModelSerializer):
    class Meta:
        model = models.ModelVersion
        fields = [
            "id",
            "federation",
            "number",
            "base",
            "produced_by",
            "sha256",
            "size_bytes",
            "n_parameters",
            "created_at",
        ]


class LedgerEntrySerializer(serializers.Serializer):
    id = serializers.IntegerField(source="entry.id")
    created_at = serializers.DateTimeField(source="entry.created_at")
    site = serializers.IntegerField(source="entry.membership.site_id")
    site_name = serializers.CharField(source="entry.membership.site.name")
    federation = serializers.IntegerField(source="entry.membership.federation_id")
    round = serializers.IntegerField(source="entry.round_id")
    round_number = serializers.IntegerField(source="entry.round.number")
    kind = serializers.CharField(source="entry.kind")
    epsilon = serializers.DecimalField(
        source="entry.epsilon", max_digits=24, decimal_places=12, allow_null=True
    )
    guarantee = serializers.SerializerMethodField()
    mechanism = serializers.CharField(source="entry.mechanism")
    mechanism_params = serializers.JSONField(source="entry.mechanism_params")
    launched_by = serializers.SerializerMethodField()
    reason = serializers.CharField(source="entry.reason")
    balance_after = BalanceSerializer(source="balance.as_dict")

    def get_guarantee(self, row) -> str:
        return "pure epsilon-DP" if row["entry"].epsilon is not None else "no formal guarantee"

    def get_launched_by(self, row) -> str | None:
        user = row["entry"].round.launched_by
        return user.get_username() if user else None


class AuditEventSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor.username", allow_null=True, default=None)
    actor_site = serializers.CharField(source="actor_site.name", allow_null=True, default=None)

    class Meta:
        model = models.AuditEvent
        fields = [
            "id",
            "created_at",
            "action",
            "actor",
            "actor_site",
            "federation",
            "site",
            "round",
            "reason",
            "details",
        ]


class TaskStatusSerializer(serializers.Serializer):
    state = serializers.ChoiceField(
        choices=[protocol.TASK_EVALUATING, protocol.TASK_TRAINING, protocol.TASK_DROPPED]
    )
    progress = serializers.FloatField(required=False, allow_null=True, default=None)
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=1000)


class MetricPointSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=64)
    step = serializers.IntegerField(default=0)
    value = serializers.FloatField()


class MetricsSerializer(serializers.Serializer):
    points = MetricPointSerializer(many=True, max_length=protocol.METRIC_POINTS_PER_MESSAGE)


class HeartbeatSerializer(serializers.Serializer):
    info = serializers.JSONField(required=False, default=dict)


class AgentTaskSerializer(serializers.Serializer):
    """Everything an agent needs to run its task."""

    task = serializers.IntegerField(source="pk")
    state = serializers.CharField()
    round = serializers.IntegerField(source="round.pk")
    round_number = serializers.IntegerField(source="round.number")
    federation = serializers.CharField(source="round.federation.name")
    base_version = serializers.IntegerField(source="round.base_version.pk")
    base_version_sha256 = serializers.CharField(source="round.base_version.sha256")
    model_config = serializers.JSONField(source="round.federation.model_config")
    mechanism = serializers.CharField(source="round.mechanism")
    mechanism_params = serializers.JSONField(source="round.mechanism_params")
    dp_event = serializers.JSONField(source="round.dp_event", allow_null=True)
    epsilon = serializers.DecimalField(
        source="round.epsilon_per_site",
        max_digits=24,
        decimal_places=12,
        allow_null=True,
        help_text="the round's own epsilon at delta, as the coordinator accounts it",
    )
    delta = serializers.FloatField(source="round.federation.budget_delta")
    training_params = serializers.JSONField(source="round.training_params")
    deadline = serializers.DateTimeField(source="round.deadline")
