"""The dashboard in headless Chromium, clicked through as people would.

The app runs under daphne (``python -m coordinator.serve``; with DEBUG on, coordinator.asgi serves
the static files) in its own process, on the test database and the same Redis channel layer as this process: so a live
metric a test records here reaches the page through the real channel layer and the real
websocket. Set SCREENSHOTS=1 to also refresh docs/screenshots/ with realistic data.

Playwright's sync API keeps an event loop running in this thread, so Django calls here need
DJANGO_ALLOW_ASYNC_UNSAFE, and services (which send events through async_to_sync) run in a
worker thread: ``background``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections
from django.test import Client

from coordinator import accounting, services
from coordinator.models import LedgerEntry, Membership, Round, Site, Task, TaskState

from .conftest import SVT_PARAMS, TINY_MODEL, join
from .servers import AsgiServer

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
TIMEOUT_MS = 15_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (scripts/ensure-chromium)"
    ),
]


# --- The app under daphne, on the test database -------------------------------------------------


@pytest.fixture(scope="module")
def app_url(django_db_setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("daphne")
    server = AsgiServer(workdir / "daphne.log", workdir / "storage")
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()
    os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


# Added to every page before its own scripts: each Content-Security-Policy violation is kept in
# window.cspViolations and logged as a console error, which fails the test (see new_page).
RECORD_CSP_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  const where = `${event.sourceFile || document.location.pathname}:${event.lineNumber}`;
  const violation = `${event.violatedDirective} blocked ${event.blockedURI || "inline"} at ${where}`;
  window.cspViolations.push(violation);
  console.error(`CSP violation: ${violation}`);
});
"""


@pytest.fixture
def new_page(chromium, app_url):
    """A fresh browser tab: ``new_page()`` signed out, ``new_page(user)`` signed in as ``user``."""
    contexts = []

    def make(user=None):
        context = chromium.new_context(
            base_url=app_url,
            viewport={"width": 1400, "height": 900},
            permissions=["clipboard-read", "clipboard-write"],
        )
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(RECORD_CSP_VIOLATIONS)
        if user is not None:
            client = Client()
            client.force_login(user)
            cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
            context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": cookie, "url": app_url}])
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        # Pages a test expects to be refused (403, 404) log "Failed to load resource": not a script error.
        page.on(
            "console",
            lambda m: (
                m.type == "error"
                and not m.text.startswith("Failed to load resource")
                and errors.append(m.text)
            ),
        )
        return page

    errors: list[str] = []
    yield make
    for context in contexts:
        context.close()
    assert not errors, f"the pages had JavaScript errors: {errors}"


def background(function, /, **kwargs):
    """Run a service in a worker thread (it sends its events with async_to_sync), and wait for it."""

    def run():
        try:
            return function(**kwargs)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result(timeout=120)


@pytest.fixture
def aggregate_here(monkeypatch):
    """No Celery worker in these tests: finish rounds by calling the aggregation service directly."""
    monkeypatch.setattr(services, "_enqueue_aggregation", lambda round_id: None)


def _finish(round_id: int) -> None:
    services.round_check_completion(round_id=round_id)
    services.round_aggregate(round_id=round_id)


# --- A coordinator's day ------------------------------------------------------------------------


def _password_the_app_can_check(user, password: str) -> None:
    """The tests hash passwords with MD5 for speed; the app under daphne only knows its own hashers."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    hasher = PBKDF2PasswordHasher()
    user.password = hasher.encode(password, hasher.salt(), iterations=1000)
    user.save(update_fields=["password"])


def test_a_coordinator_registers_a_site_sets_a_budget_launches_and_watches_live(
    new_page, federation, sites, alice
):
    _password_the_app_can_check(alice, "alice-password-123")
    page = new_page()
    page.goto("/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("alice-password-123")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name="BraTS study").wait_for()

    # Register a site; its token is shown once, with the command to run at the hospital.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Sites").click()
    page.get_by_label("Site name").fill("Hospital C")
    page.get_by_label("Federation").select_option(label="BraTS study")
    page.get_by_label("Privacy budget (ε)").fill("3")
    page.get_by_role("button", name="Register site").click()
    token = page.locator("#site-token").inner_text().strip()
    assert services.site_authenticate(token) == Site.objects.get(name="Hospital C")
    command = page.locator("#agent-command").inner_text()
    assert f"--token {token} --data " in command and command.startswith(
        "python -m sitesagent run --server http"
    )
    page.wait_for_selector("body[data-ready=true]")
    page.get_by_role("button", name="Copy token").click()
    assert page.evaluate("navigator.clipboard.readText()") == token
    page.get_by_role("link", name="Done, go to the site").click()
    page.get_by_role("heading", name="Hospital C").wait_for()
    assert token not in page.content()
    # Registered into the study, the site is invited; its registrant accepts while it has no admins.
    page.get_by_role("button", name="Accept").click()
    page.get_by_text("Hospital C now takes part in BraTS study.").wait_for()

    # Set a budget, with a reason.
    page.goto(f"/federations/{federation.pk}/budgets/")
    row = page.locator("#budget-table tr", has_text="Hospital A")
    row.locator("input[name=budget]").fill("5")
    row.locator("input[name=reason]").fill("ethics board approved")
    row.get_by_role("button", name="Set").click()
    page.get_by_text("Hospital A's budget is now ε 5.").wait_for()
    assert (
        page.locator("#budget-table tr", has_text="Hospital A").locator("[data-budget]").inner_text() == "5"
    )
    assert Membership.objects.get(site__name="Hospital A").budget_epsilon == 5

    # Preview and launch: the preview follows the form.
    page.get_by_role("link", name="Launch a round").first.click()
    preview_epsilon = page.locator("[data-preview-epsilon]")
    assert preview_epsilon.inner_text() == "1"
    page.wait_for_selector("body[data-ready=true]")
    page.get_by_label("ε release").fill("1.5")
    # A function, not an expression: Playwright evals expressions, which the page's CSP forbids.
    page.wait_for_function(
        "() => document.querySelector('[data-preview-epsilon]').textContent.trim() === '2'"
    )
    after = page.locator("#preview-sites tr", has_text="Hospital B").locator("[data-after]")
    assert after.inner_text() == "2"  # the accountant's epsilon after this round, of a budget of 2
    # The suite's SVT parameters are mostly noise: the preview says so, and the launch needs a tick.
    assert page.get_by_text("The update will be mostly noise").first.is_visible()
    page.get_by_label("Launch even if the updates would be mostly noise").check()
    page.get_by_role("button", name="Launch", exact=True).click()
    page.get_by_text("Round 1 launched with 3 site(s).").wait_for()
    round_ = Round.objects.get()
    assert page.url.endswith(f"/rounds/{round_.pk}/")

    # A live metric arrives through the channel layer and the websocket, without a reload.
    page.wait_for_selector("body[data-live=connected]")
    page.evaluate("window.notReloaded = true")
    task = Task.objects.select_related("round", "site").get(round=round_, site__name="Hospital A")
    background(services.task_report, task=task, state=TaskState.TRAINING, progress=0.5)
    background(
        services.metrics_record, task=task, points=[{"name": "train_loss", "step": 1, "value": 0.4242}]
    )
    row = page.locator(f"#task-table tr[data-task-id='{task.pk}']")
    row.locator("[data-latest=train_loss]").filter(has_text="0.4242").wait_for()
    assert row.locator("[data-task-state]").inner_text() == "training"
    assert row.locator("[data-progress-text]").inner_text() == "50%"
    traces = page.evaluate(
        "document.getElementById('loss-chart').data.map(t => ({site: t.meta.site, y: Array.from(t.y)}))"
    )
    assert {"site": task.site_id, "y": [0.4242]} in traces
    assert page.evaluate("window.notReloaded") is True


# --- The auditor's numbers ----------------------------------------------------------------------


def test_the_audit_pages_numbers_equal_the_ledgers(
    new_page, federation, sites, alice, charlie, aggregate_here
):
    def world():
        round_1 = services.round_launch(federation=federation, launched_by=alice)
        for task in round_1.tasks.select_related("round", "site"):
            _upload(task, n_cases=12)
        _finish(round_1.pk)
        round_2 = services.round_launch(
            federation=federation, launched_by=alice, mechanism_params={**SVT_PARAMS, "eps_release": 0.25}
        )
        services.round_abort(round_=round_2, aborted_by=alice, reason="wrong split")
        services.round_launch(federation=federation, launched_by=alice)  # still reserved

    background(world)
    page = new_page(charlie)
    page.goto(f"/federations/{federation.pk}/privacy/")
    memberships = list(federation.memberships.all())
    expected = accounting.ledger_with_balances(
        LedgerEntry.objects.filter(membership__in=memberships).order_by("id"),
        memberships,
    )
    rows = page.locator("#ledger-table tbody tr")
    assert rows.count() == len(expected) == 10
    for index, want in enumerate(expected):
        row, entry, balance = rows.nth(index), want["entry"], want["balance"]
        assert int(row.get_attribute("data-entry-id")) == entry.pk
        assert Decimal(row.locator("[data-epsilon]").inner_text()) == entry.epsilon
        assert Decimal(row.locator("[data-committed-after]").inner_text()) == balance.committed
        assert Decimal(row.locator("[data-reserved-after]").inner_text()) == balance.reserved
        assert Decimal(row.locator("[data-remaining-after]").inner_text()) == balance.remaining
    for membership in memberships:
        committed = accounting.membership_balance(membership).committed
        shown = page.locator("#composition-table tr", has_text=membership.site.name).locator(
            "[data-committed]"
        )
        assert Decimal(shown.inner_text()) == committed == Decimal(1)
    assert page.get_by_text("dp-accounting 0.6.0, privacy loss distributions").is_visible()

    # Filter to one site and one kind, as an auditor would.
    page.get_by_label("Site", exact=True).select_option(label="Hospital B")
    page.get_by_label("Kind", exact=True).select_option(label="Release")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**kind=release**")
    released = LedgerEntry.objects.filter(membership__site__name="Hospital B", kind="release")
    assert page.locator("#ledger-table tbody tr").count() == released.count() == 1

    # The overview follows round states live: the open round is aborted elsewhere.
    page.goto(f"/federations/{federation.pk}/")
    page.wait_for_selector("body[data-live=connected]")
    open_round = Round.objects.get(number=3)
    badge = page.locator(f"#rounds-table tr[data-round-id='{open_round.pk}'] [data-round-state]")
    assert badge.inner_text() == "reserved"
    background(services.round_abort, round_=open_round, aborted_by=alice, reason="changed our minds")
    badge.filter(has_text="aborted").wait_for()


def _upload(task, *, n_cases: int) -> None:
    from .test_dashboard import upload

    upload(task, n_cases=n_cases)


# --- A site admin sees their site only ----------------------------------------------------------


def test_a_site_admin_cannot_see_another_sites_pages_or_data(new_page, federation, sites, alice, bob):
    round_ = background(services.round_launch, federation=federation, launched_by=alice)
    task_a = Task.objects.select_related("round", "site").get(round=round_, site=sites["A"][0])
    task_b = Task.objects.select_related("round", "site").get(round=round_, site=sites["B"][0])
    page = new_page(bob)

    page.goto(f"/federations/{federation.pk}/")
    tabs = page.get_by_role("navigation", name="Federation")
    assert tabs.get_by_role("link", name="Budgets").is_visible()
    assert tabs.get_by_role("link", name="Launch a round").count() == 0
    assert tabs.get_by_role("link", name="Audit log").count() == 0
    page.goto(f"/federations/{federation.pk}/budgets/")
    assert page.locator("#budget-table tbody tr").all_inner_texts()[0].startswith("Hospital A")
    assert page.locator("#budget-table tbody tr").count() == 1
    for path in (f"/sites/{sites['B'][0].pk}/", f"/federations/{federation.pk}/launch/"):
        assert page.goto(path).status in (403, 404), path
    assert page.goto(f"/federations/{federation.pk}/audit-log/").status == 403

    page.goto(f"/rounds/{round_.pk}/")
    assert page.locator("#task-table tbody tr").all_inner_texts()[0].startswith("Hospital A")
    assert page.locator("#task-table tbody tr").count() == 1
    page.wait_for_selector("body[data-live=connected]")
    background(
        services.metrics_record, task=task_b, points=[{"name": "train_loss", "step": 1, "value": 0.999}]
    )
    background(
        services.metrics_record, task=task_a, points=[{"name": "train_loss", "step": 1, "value": 0.111}]
    )
    page.locator("[data-latest=train_loss]").filter(has_text="0.1110").wait_for()
    traces = page.evaluate(
        "document.getElementById('loss-chart').data.map(t => [t.meta.site, Array.from(t.y)])"
    )
    assert traces == [[sites["A"][0].pk, [0.111]]]
    assert "Hospital B" not in page.content() and "0.999" not in page.content()


# --- Nothing a site sends can change what a viewer's page does --------------------------------------

EVIL_SITE = '<a href="https://attacker.example/" id="planted">Hospital X</a>'


def test_a_sites_metric_names_and_its_name_cannot_deface_a_viewers_page(new_page, federation, sites, alice):
    """A metric named `x"],body,[x="` once turned round.js's selector into one matching <body>,
    and a site named with markup became a live link in the charts' legend."""

    def world():
        evil, _ = services.site_register(name=EVIL_SITE, registered_by=alice)
        join(federation, evil, budget=2, added_by=alice, accepted_by=alice)
        round_ = services.round_launch(federation=federation, launched_by=alice)
        for task in round_.tasks.select_related("round", "site"):  # a legend has two or more lines
            services.metrics_record(task=task, points=[{"name": "train_loss", "step": 0, "value": 0.9}])
        return round_, Task.objects.select_related("round", "site").get(round=round_, site=evil)

    round_, evil_task = background(world)
    page = new_page(alice)
    page.goto(f"/rounds/{round_.pk}/")
    page.wait_for_selector("body[data-live=connected]")
    page.locator("#loss-chart .main-svg").first.wait_for()
    hostile = [
        {"name": 'x"],body,[x="', "step": 1, "value": 0.5},
        {"name": "train_loss", "step": 1, "value": 0.4242},
    ]
    background(services.metrics_record, task=evil_task, points=hostile)
    row = page.locator(f"#task-table tr[data-task-id='{evil_task.pk}']")
    row.locator("[data-latest=train_loss]").filter(has_text="0.4242").wait_for()
    assert page.locator("#task-table").count() == 1 and page.locator("#loss-chart").count() == 1
    assert page.locator("#loss-chart a, #throughput-chart a, #planted").count() == 0
    legend = page.evaluate(
        "() => Array.from(document.querySelectorAll('#loss-chart .legendtext'), (t) => t.textContent)"
    )
    assert EVIL_SITE in legend
    # Traces added live (for a site the page had not drawn) escape the name too.
    added = page.evaluate(
        "async (name) => (await import('/static/js/charts.js')).plotlyText(name)", EVIL_SITE
    )
    assert added == EVIL_SITE.replace("<", "&lt;").replace(">", "&gt;")


# --- Every page under the Content-Security-Policy ------------------------------------------------


def _visit_under_csp(page, path: str) -> None:
    """Open ``path`` and check it works under the policy: scripts ran, charts drew, bars have their
    widths, the live socket connected, and nothing was blocked."""
    from coordinator.security import CONTENT_SECURITY_POLICY

    response = page.goto(path)
    assert response.status == 200, path
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
    page.wait_for_load_state("load")
    if page.locator("script[src$='/page.js']").count():  # every page but Django's admin
        page.wait_for_selector("body[data-ready=true]")
    for chart in page.locator("[data-figure]").all():
        chart.locator(".main-svg").first.wait_for()
        assert "js-plotly-plot" in chart.get_attribute("class")
    if page.locator("[data-figure]").count():
        # plotly's own rules come from static/css/plotly.css, not from a <style> it injects.
        assert page.evaluate("getComputedStyle(document.querySelector('.main-svg')).position") == "absolute"
    for bar in page.locator("[data-bar-width]").all():
        assert bar.evaluate("b => b.style.width") == f"{bar.get_attribute('data-bar-width')}%", path
    if page.locator("[data-live-status]").count():
        page.wait_for_selector("body[data-live=connected]")
    assert page.evaluate("window.cspViolations") == [], path


def test_every_page_works_under_the_content_security_policy(
    new_page, federation, sites, alice, bob, charlie, aggregate_here
):
    def world():
        finished = services.round_launch(federation=federation, launched_by=alice)
        for task in finished.tasks.select_related("round", "site"):
            dice = [
                {"name": name, "step": 1, "value": 0.6}
                for name in ("dice_et", "dice_wt", "dice_tc", "dice_mean")
            ]
            services.metrics_record(task=task, points=dice)
            _upload(task, n_cases=12)
        _finish(finished.pk)
        live = services.round_launch(federation=federation, launched_by=alice)
        task = live.tasks.select_related("round", "site").get(site=sites["A"][0])
        services.task_report(task=task, state=TaskState.TRAINING, progress=0.5)
        services.metrics_record(task=task, points=[{"name": "train_loss", "step": 1, "value": 0.5}])
        return finished, live

    finished, live = background(world)
    fed, site_a = federation.pk, sites["A"][0].pk
    pages = {
        alice: [
            "/",
            f"/federations/{fed}/",
            f"/federations/{fed}/budgets/",
            f"/federations/{fed}/launch/",
            f"/federations/{fed}/privacy/",
            f"/federations/{fed}/audit-log/",
            f"/rounds/{finished.pk}/",
            f"/rounds/{live.pk}/",
            "/sites/",
            f"/sites/{site_a}/",
        ],
        bob: [
            "/",
            f"/federations/{fed}/",
            f"/federations/{fed}/budgets/",
            f"/rounds/{live.pk}/",
            f"/sites/{site_a}/",
        ],
        charlie: [
            "/",
            f"/federations/{fed}/",
            f"/federations/{fed}/privacy/",
            f"/federations/{fed}/audit-log/",
        ],
        None: ["/login/", "/admin/login/"],
    }
    for user, paths in pages.items():
        page = new_page(user)
        for path in paths:
            _visit_under_csp(page, path)

    page = new_page(alice)
    # The launch form's preview is fetched as the form changes.
    _visit_under_csp(page, f"/federations/{fed}/launch/")
    page.get_by_label("ε release").fill("1.5")
    page.locator("[data-preview-epsilon]").filter(has_text="2").wait_for()
    # A chart exports itself as a PNG (plotly draws it through a data: image).
    _visit_under_csp(page, f"/federations/{fed}/")
    page.locator("#dice-chart").hover()
    with page.expect_download() as download:
        page.locator("#dice-chart .modebar-btn[data-title^='Download']").click()
    assert download.value.suggested_filename.endswith(".png")
    # A site registered: its token page's copy button works.
    page.goto("/sites/")
    page.get_by_label("Site name").fill("Hospital C")
    page.get_by_role("button", name="Register site").click()
    page.wait_for_selector("body[data-ready=true]")
    page.get_by_role("button", name="Copy token").click()
    assert page.evaluate("navigator.clipboard.readText()") == page.locator("#site-token").inner_text().strip()
    assert page.evaluate("window.cspViolations") == []


# --- Screenshots for the README -----------------------------------------------------------------


SITES = [
    ("Northgate University Hospital", "cuda:0", 62, 14.0),
    ("Riverside Medical Centre", "cuda:0", 45, 11.5),
    ("St. Aldric Clinic", "cpu", 30, 1.6),
    ("Lakeshore Cancer Institute", "cpu", 18, 1.2),
]


def _build_study(alice, bob, charlie):
    """A study five rounds in, with a sixth training: enough to make every page worth a look."""
    import math
    import random

    from .test_dashboard import upload

    rng = random.Random(7)
    federation = services.federation_create(
        name="BraTS 2018 multi-institution study",
        created_by=alice,
        model_config=TINY_MODEL,
        default_mechanism="svt",
        default_mechanism_params=SVT_PARAMS,
        budget_delta=0,
        min_sites=2,
        training_defaults={"local_epochs": 1, "max_iterations": 0, "roi_size": 64},
    )
    federation.auditors.add(charlie)
    sites = []
    for index, (name, device, cases, speed) in enumerate(SITES):
        site, _ = services.site_register(name=name, registered_by=alice)
        join(federation, site, budget=8, added_by=alice, accepted_by=alice, reason="ethics approval")
        problems = 1 if index == 3 else 0
        check = {
            "n_cases": cases - problems,
            "n_problems": problems,
            "ok": not problems,
            "shapes": [[240, 240, 155]],
            "spacings": [[1.0, 1.0, 1.0]],
            "orientations": ["RAS"],
            "cases_with_region": {"et": cases - 2, "tc": cases - problems, "wt": cases - problems},
        }
        services.site_heartbeat(site=site, info={"device": device, "cases": cases, "data_check": check})
        sites.append((site, cases, speed))
    services.site_admin_add(site=sites[0][0], user=bob, added_by=alice)

    def stream(task, site_index, speed, steps):
        points = []
        for step in range(1, steps + 1):
            loss = 0.9 * math.exp(-step / (25 + 5 * site_index)) + 0.25 - 0.02 * task.round.number
            points.append({"name": "train_loss", "step": step, "value": round(loss + rng.gauss(0, 0.015), 4)})
            points.append(
                {"name": "throughput", "step": step, "value": round(speed * rng.uniform(0.9, 1.1), 2)}
            )
        services.metrics_record(task=task, points=points)

    for number in range(1, 7):
        round_ = services.round_launch(federation=federation, launched_by=alice)
        for index, (site, cases, speed) in enumerate(sites):
            task = Task.objects.select_related("round", "site").get(round=round_, site=site)
            base = 0.2 + 0.55 * (1 - math.exp(-(number - 1) / 2.2)) - 0.04 * index
            dice = {
                "dice_wt": base + 0.12,
                "dice_tc": base + 0.02,
                "dice_et": base - 0.08,
            }
            dice = {k: round(min(0.95, max(0.02, v + rng.gauss(0, 0.02))), 4) for k, v in dice.items()}
            dice["dice_mean"] = round(sum(dice.values()) / 3, 4)
            points = [{"name": k, "step": number, "value": v} for k, v in dice.items()]
            services.task_report(task=task, state=TaskState.EVALUATING, progress=0.0)
            services.metrics_record(task=task, points=points)
            services.task_report(task=task, state=TaskState.TRAINING, progress=0.0)
            if number == 6:
                steps = [60, 42, 12, 5][index]
                stream(task, index, speed, steps)
                services.task_report(task=task, state=TaskState.TRAINING, progress=steps / 60)
                continue
            if number == 4 and index == 3:
                services.task_report(
                    task=task, state=TaskState.DROPPED, reason="the agent ran out of disk space"
                )
                continue
            stream(task, index, speed, 60)
            upload(task, n_cases=cases, seed=100 * number + index)
        if number < 6:
            _finish(round_.pk)
    services.budget_set(
        membership=Membership.objects.get(federation=federation, site=sites[3][0]),
        budget=6,
        changed_by=alice,
        reason="site asked for a lower cap",
    )
    return federation, [site for site, _, _ in sites]


def test_screenshots_of_every_page(new_page, alice, bob, charlie, aggregate_here):
    if os.environ.get("SCREENSHOTS") != "1":
        pytest.skip("set SCREENSHOTS=1 to refresh docs/screenshots/")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    federation, sites = background(_build_study, alice=alice, bob=bob, charlie=charlie)
    rounds = {r.number: r for r in federation.rounds.all()}

    def shoot(page, name: str) -> None:
        page.wait_for_load_state("load")
        if page.locator("script[type=module]").count():
            page.wait_for_selector("body[data-ready=true]")
        if page.locator("[data-live-status]").count():
            page.wait_for_selector("body[data-live=connected]")
        for chart in page.locator("[data-figure]").all():
            chart.locator(".main-svg").first.wait_for()
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    page = new_page()
    page.goto("/login/")
    shoot(page, "01-sign-in")

    page = new_page(alice)
    for name, path in [
        ("02-federations", "/"),
        ("03-federation-overview", f"/federations/{federation.pk}/"),
        ("04-sites", "/sites/"),
        ("05-site", f"/sites/{sites[3].pk}/"),
        ("07-budgets", f"/federations/{federation.pk}/budgets/"),
        ("08-launch-round", f"/federations/{federation.pk}/launch/"),
        ("09-live-round", f"/rounds/{rounds[6].pk}/"),
        ("10-finished-round", f"/rounds/{rounds[4].pk}/"),
        ("11-privacy-audit", f"/federations/{federation.pk}/privacy/"),
        ("12-audit-log", f"/federations/{federation.pk}/audit-log/"),
    ]:
        page.goto(path)
        shoot(page, name)

    page.goto("/sites/")
    page.get_by_label("Site name").fill("Harbourview Children's Hospital")
    page.get_by_label("Federation").select_option(label=federation.name)
    page.get_by_label("Privacy budget (ε)").fill("8")
    page.get_by_role("button", name="Register site").click()
    page.locator("#site-token").wait_for()
    shoot(page, "06-site-registered-token")

    page = new_page(bob)
    page.goto(f"/federations/{federation.pk}/")
    shoot(page, "13-site-admin-overview")
    page.goto(f"/rounds/{rounds[6].pk}/")
    shoot(page, "14-site-admin-round")
    assert len(list(SCREENSHOTS.glob("*.png"))) >= 14
