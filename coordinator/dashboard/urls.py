from django.contrib.auth import views as auth_views
from django.urls import path

from coordinator.dashboard import views

urlpatterns = [
    path("login/", views.SignInView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.home, name="home"),
    path("federations/<int:pk>/", views.federation, name="dashboard-federation"),
    path("federations/<int:pk>/budgets/", views.budgets, name="dashboard-budgets"),
    path("federations/<int:pk>/launch/", views.launch, name="dashboard-launch"),
    path("federations/<int:pk>/launch/preview/", views.launch_preview, name="dashboard-launch-preview"),
    path("federations/<int:pk>/privacy/", views.privacy, name="dashboard-privacy"),
    path(
        "federations/<int:pk>/privacy/ledger.<str:fmt>",
        views.privacy_export,
        name="dashboard-privacy-export",
    ),
    path("federations/<int:pk>/audit-log/", views.audit_log, name="dashboard-audit-log"),
    path("rounds/<int:pk>/", views.round_detail, name="dashboard-round"),
    path("rounds/<int:pk>/abort/", views.round_abort, name="dashboard-round-abort"),
    path("sites/", views.sites, name="dashboard-sites"),
    path("sites/<int:pk>/", views.site_detail, name="dashboard-site"),
    path("sites/<int:pk>/rotate/", views.site_rotate, name="dashboard-site-rotate"),
    path("sites/<int:pk>/revoke/", views.site_revoke, name="dashboard-site-revoke"),
    path("sites/<int:pk>/join/", views.site_join, name="dashboard-site-join"),
    path("memberships/<int:pk>/accept/", views.membership_accept, name="dashboard-membership-accept"),
    path("memberships/<int:pk>/leave/", views.membership_leave, name="dashboard-membership-leave"),
]
