"""Django admin for every model. The ledger and the audit log are read-only here too."""

from django.contrib import admin

from coordinator import models


@admin.register(models.Federation)
class FederationAdmin(admin.ModelAdmin):
    list_display = ["name", "default_mechanism", "min_sites", "aggregation_rule", "created_at"]
    filter_horizontal = ["coordinators", "auditors"]


@admin.register(models.Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = ["name", "last_seen_at", "revoked_at", "created_at"]
    exclude = ["token_hash"]
    readonly_fields = ["token_rotated_at", "revoked_at", "last_seen_at", "agent_info"]
    filter_horizontal = ["admins"]


@admin.register(models.Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["site", "federation", "budget_epsilon", "allows_unprotected_sharing"]
    # Budgets change through the dashboard or API, which audit the change and its reason.
    readonly_fields = ["budget_epsilon"]


@admin.register(models.ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["federation", "number", "sha256", "size_bytes", "created_at"]
    readonly_fields = [f.name for f in models.ModelVersion._meta.fields]


@admin.register(models.Round)
class RoundAdmin(admin.ModelAdmin):
    list_display = ["federation", "number", "state", "mechanism", "epsilon_per_site", "launched_at"]
    list_filter = ["state", "mechanism"]
    readonly_fields = [f.name for f in models.Round._meta.fields]


@admin.register(models.Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ["round", "site", "state", "progress", "updated_at"]
    readonly_fields = [f.name for f in models.Task._meta.fields]


@admin.register(models.Update)
class UpdateAdmin(admin.ModelAdmin):
    list_display = ["task", "status", "encoding", "n_values", "n_iterations", "created_at"]
    readonly_fields = [f.name for f in models.Update._meta.fields]


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(models.LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "membership", "round", "kind", "epsilon", "mechanism"]
    list_filter = ["kind", "mechanism"]


@admin.register(models.AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "action", "actor", "actor_site", "federation", "site", "round"]
    list_filter = ["action"]


@admin.register(models.MetricPoint)
class MetricPointAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "federation", "round", "site", "name", "step", "value"]


@admin.register(models.PersonalToken)
class PersonalTokenAdmin(admin.ModelAdmin):
    list_display = ["user", "name", "created_at", "revoked_at"]
    exclude = ["token_hash"]
