from django.urls import path

from coordinator.api import views

urlpatterns = [
    path("federations/", views.federations, name="api-federations"),
    path("federations/<int:pk>/", views.federation_detail, name="api-federation"),
    path("federations/<int:pk>/memberships/", views.memberships, name="api-memberships"),
    path("federations/<int:pk>/rounds/", views.rounds, name="api-rounds"),
    path("federations/<int:pk>/rounds/preview/", views.round_preview, name="api-round-preview"),
    path("federations/<int:pk>/versions/", views.versions, name="api-versions"),
    path("federations/<int:pk>/ledger/", views.federation_ledger, name="api-federation-ledger"),
    path("federations/<int:pk>/audit/", views.federation_audit, name="api-federation-audit"),
    path("sites/", views.sites, name="api-sites"),
    path("sites/<int:pk>/", views.site_detail, name="api-site"),
    path("sites/<int:pk>/rotate-token/", views.site_rotate_token, name="api-site-rotate"),
    path("sites/<int:pk>/revoke/", views.site_revoke, name="api-site-revoke"),
    path("memberships/<int:pk>/", views.membership_detail, name="api-membership"),
    path("memberships/<int:pk>/ledger/", views.membership_ledger, name="api-membership-ledger"),
    path("memberships/<int:pk>/accept/", views.membership_accept, name="api-membership-accept"),
    path("memberships/<int:pk>/leave/", views.membership_leave, name="api-membership-leave"),
    path("rounds/<int:pk>/", views.round_detail, name="api-round"),
    path("rounds/<int:pk>/abort/", views.round_abort, name="api-round-abort"),
    path("versions/<int:pk>/weights/", views.version_weights, name="api-version-weights"),
    path("tokens/", views.personal_tokens, name="api-tokens"),
    path("agent/task/", views.agent_next_task, name="api-agent-next-task"),
    path("agent/tasks/<int:pk>/", views.agent_task, name="api-agent-task"),
    path("agent/tasks/<int:pk>/status/", views.agent_task_status, name="api-agent-task-status"),
    path("agent/tasks/<int:pk>/metrics/", views.agent_task_metrics, name="api-agent-task-metrics"),
    path("agent/tasks/<int:pk>/update/", views.agent_task_update, name="api-agent-task-update"),
    path("agent/heartbeat/", views.agent_heartbeat, name="api-agent-heartbeat"),
]
