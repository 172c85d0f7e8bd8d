"""The dashboard's pages: server-rendered, each one checking access through coordinator.access."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from coordinator import access


@login_required
def home(request):
    federations = access.federations_visible_to(request.user).order_by("name")
    return render(request, "home.html", {"federations": federations})
