"""The cast and the fixtures every test shares.

alice coordinates the federation; bob administers site A; dave administers site B;
charlie audits; eve is signed in but has no role at all.
"""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from sitesagent.model import preset

# A SegResNet small enough to build in milliseconds; the shape of the real one.
TINY_MODEL = preset("tiny").to_dict()
SVT_PARAMS = {
    "fraction": 0.1,
    "gamma": 0.01,
    "tau": 0.001,
    "eps_threshold": 0.1,
    "eps_query": 0.4,
    "eps_release": 0.5,
}


@pytest.fixture(autouse=True)
def _fast_and_isolated(settings, tmp_path):
    settings.STORAGE_DIR = tmp_path / "storage"
    # The cast's passwords need no protection; PBKDF2 would cost a second per test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Failed-authentication counts (coordinator.ratelimit) live in the shared Redis: a key prefix
    # of its own keeps one test's failures from counting against the next.
    settings.CACHES = {"default": {**settings.CACHES["default"], "KEY_PREFIX": f"test-{uuid.uuid4().hex}"}}


def make_user(username: str, **extra):
    return get_user_model().objects.create_user(
        username=username, password=f"{username}-password-123", **extra
    )


@pytest.fixture
def alice(db):
    return make_user("alice", is_staff=True)


@pytest.fixture
def bob(db):
    return make_user("bob")


@pytest.fixture
def charlie(db):
    return make_user("charlie")


@pytest.fixture
def dave(db):
    return make_user("dave")


@pytest.fixture
def eve(db):
    return make_user("eve")


@pytest.fixture
def federation(alice, charlie):
    from coordinator import services

    federation = services.federation_create(
        name="BraTS study",
        created_by=alice,
        model_config=TINY_MODEL,
        default_mechanism="svt",
        default_mechanism_params=SVT_PARAMS,
        budget_delta=0,  # pure-DP budgets: SVT rounds compose to their exact sum
        min_sites=1,
        training_defaults={"local_epochs": 0, "max_iterations": 2, "roi_size": 16},
    )
    federation.auditors.add(charlie)
    return federation


@pytest.fixture
def three_sites(federation, alice):
    """Three member sites (accepted) with a budget of 5 epsilon each, no admins: {site id: token}."""
    from coordinator import services

    tokens = {}
    for label in "ABC":
        site, token = services.site_register(name=f"Hospital {label}", registered_by=alice)
        join(federation, site, budget=5, added_by=alice, accepted_by=alice)  # alice registered it
        tokens[site.pk] = token
    return tokens


def join(federation, site, *, budget, added_by, accepted_by, reason: str = "joined the study", **options):
    """A site invited into a federation and accepting: the membership it takes part through."""
    from coordinator import services

    membership = services.membership_add(
        federation=federation, site=site, budget=budget, added_by=added_by, reason=reason, **options
    )
    return services.membership_accept(membership=membership, accepted_by=accepted_by)


@pytest.fixture
def sites(federation, alice, bob, dave):
    """Two member sites (accepted by their admins, bob and dave) with a budget of 2 epsilon each:
    {"A": (site, token), "B": (site, token)}."""
    from coordinator import services

    registered = {}
    for label, admin in (("A", bob), ("B", dave)):
        site, token = services.site_register(name=f"Hospital {label}", registered_by=alice)
        services.site_admin_add(site=site, user=admin, added_by=alice)
        join(federation, site, budget=2, added_by=alice, accepted_by=admin)
        registered[label] = (site, token)
    return registered


@pytest.fixture
def client_for():
    """An API client signed in as a user (session), or holding a site's bearer token."""

    def make(principal=None, *, token: str | None = None) -> APIClient:
        client = APIClient()
        if principal is not None:
            client.force_login(principal)
        if token is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        return client

    return make
