from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from coordinator.api.views import healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/", include("coordinator.api.urls")),
    path("admin/", admin.site.urls),
    path("", include("coordinator.dashboard.urls")),
]
