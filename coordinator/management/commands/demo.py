"""``python manage.py demo``: a whole federation on this machine, live, in one command.

Starts the web app (daphne), a Celery worker with beat, and N site agents as separate
processes, each agent on its own synthetic cases with its own scanner style; creates a demo
coordinator account; runs R rounds back to back and prints a line per round. Ctrl-C (or, with
--exit-when-done, the last round) stops every process it started.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from coordinator import accounting, charts, embedded_redis, selectors, services
from coordinator.models import Federation, Membership, Round, RoundState, Site
from coordinator.processes import ChildProcess, agent_command, daphne_command, worker_command
from sitesagent.model import preset
from sitesagent.synth import write_synthetic_cases

DEMO_FEDERATION = "Demo federation"
DEMO_USER = "coordinator"
# Small enough for about a minute a round on two CPU cores; the BraTS setting on a GPU.
CPU_SETUP = {
    "model": preset("cpu").to_dict(),
    "training": {"local_epochs": 1, "max_iterations": 8, "batch_size": 1, "roi_size": 24, "lr": 1e-3},
    "size": "small",
    "cases": 32,
}
GPU_SETUP = {
    "model": preset("brats").to_dict(),
    "training": {"local_epochs": 1, "max_iterations": 0, "batch_size": 1, "roi_size": 128, "lr": 1e-4},
    "size": "brats",
    "cases": 16,
}
# Patient-level DP-SGD (DESIGN 6): each step takes each case with probability 0.5, clips each
# case's gradient to norm 1 and adds Gaussian noise of std 1.47. The accountant puts one round at
# epsilon 5.37, two at 7.66 and the default three at 9.53 per site, at delta 1e-5: within the
# demo's budget of 10 (a longer series stops at the first round that would pass it). Patient-level
# DP needs many patients: 32 cases a site (26 for training) make a step average about 13 cases,
# which keeps the noise on each coordinate of the averaged gradient at sigma / (q N) = 0.11 of
# the clip bound; 24^3 crops keep a round near a minute on two cores.
DEMO_PRIVACY = {
    "noise_multiplier": 1.47,
    "max_grad_norm": 1.0,
    "sample_rate": 0.5,
    "steps": 8,
    "crops_per_case": 1,
}
DEMO_BUDGET = 10
DEMO_DELTA = 1e-5
ROUND_TIMEOUT_SECONDS = 900


class Command(BaseCommand):
    help = "Run a whole federation locally: web app, worker, and synthetic sites, with rounds running live."

    def add_arguments(self, parser):
        parser.add_argument("--sites", type=int, default=3, help="how many site agents (default 3)")
        parser.add_argument("--rounds", type=int, default=3, help="how many rounds to run (default 3)")
        parser.add_argument("--port", type=int, default=8000, help="the dashboard's port (default 8000)")
        parser.add_argument(
            "--exit-when-done",
            action="store_true",
            help="stop everything and exit once the rounds are done (non-zero if one fails)",
        )
        parser.add_argument("--gpu", action="store_true", help="the full BraTS configuration (needs CUDA)")

    def handle(self, *args, sites: int, rounds: int, port: int, exit_when_done: bool, gpu: bool, **options):
        if sites < 1 or rounds < 1:
            raise CommandError("--sites and --rounds must be at least 1")
        setup = GPU_SETUP if gpu else CPU_SETUP
        call_command("migrate", verbosity=0)
        password = self._demo_user()
        federation = self._federation(setup)
        site_tokens = self._sites(federation, sites)
        processes = Processes(self.stdout)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            self._start(processes, port, site_tokens, setup, gpu)
            self.stdout.write(
                self.style.SUCCESS(
                    f"\nDashboard: http://127.0.0.1:{port}/  (sign in as {DEMO_USER} / {password})\n"
                )
            )
            user = get_user_model().objects.get(username=DEMO_USER)
            first = services.federation_run_rounds(
                federation=federation,
                count=rounds,
                started_by=user,
                site_ids=[site.pk for site in site_tokens],
            )
            failure = self._follow(first, rounds, processes)
            if failure:
                raise CommandError(failure)
            if exit_when_done:
                self.stdout.write(self.style.SUCCESS(f"{rounds} round(s) done."))
                return
            self.stdout.write("Rounds done. The dashboard stays up until Ctrl-C.")
            while processes.all_alive():
                time.sleep(1)
            raise CommandError(f"a demo process stopped: {processes.first_dead()}")
        except KeyboardInterrupt:
            self.stdout.write("\nStopping...")
        finally:
            processes.stop_all()
            if not os.environ.get("REDIS_URL"):
                embedded_redis.stop(settings.VAR_DIR / "redis")

    # --- the cast ---------------------------------------------------------------------------

    def _demo_user(self) -> str:
        password = secrets.token_urlsafe(9)
        user, _ = get_user_model().objects.get_or_create(username=DEMO_USER, defaults={"is_staff": True})
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        return password

    def _federation(self, setup: dict) -> Federation:
        """A fresh federation for each run; earlier runs stay on the dashboard as history."""
        user = get_user_model().objects.get(username=DEMO_USER)
        # A previous run may have been stopped mid-round: close what it left open.
        for round_ in Round.objects.filter(
            federation__name__startswith=DEMO_FEDERATION, state__in=[RoundState.RESERVED, RoundState.TRAINING]
        ):
            services.round_abort(round_=round_, aborted_by=user, reason="a new demo run started")
        name = f"{DEMO_FEDERATION} {timezone.now():%Y-%m-%d %H:%M:%S}"
        return services.federation_create(
            name=name,
            created_by=user,
            model_config=setup["model"],
            model_seed=0,
            default_mechanism="dpsgd",
            default_mechanism_params=DEMO_PRIVACY,
            budget_delta=DEMO_DELTA,
            training_defaults=setup["training"],
            min_sites=1,
            round_deadline_seconds=ROUND_TIMEOUT_SECONDS,
        )

    def _sites(self, federation: Federation, count: int) -> dict[Site, str]:
        user = get_user_model().objects.get(username=DEMO_USER)
        tokens = {}
        for index in range(count):
            name = f"Demo hospital {index + 1}"
            site = Site.objects.filter(name=name).first()
            if site is None:
                site, token = services.site_register(name=name, registered_by=user)
            else:
                token = services.site_token_rotate(site=site, rotated_by=user)
            membership = Membership.objects.filter(federation=federation, site=site).first()
            if membership is None:
                membership = services.membership_add(
                    federation=federation, site=site, budget=DEMO_BUDGET, added_by=user, reason="demo site"
                )
                # The demo plays each hospital's site admin too: its registrant, while it has none.
                services.membership_accept(membership=membership, accepted_by=user)
            elif accounting.membership_balance(membership).remaining < DEMO_BUDGET / 2:
                services.budget_set(
                    membership=membership,
                    budget=membership.budget_epsilon + DEMO_BUDGET,
                    changed_by=user,
                    reason="demo: top up for another run",
                )
            tokens[site] = token
        return tokens

    # --- processes --------------------------------------------------------------------------

    def _start(
        self, processes: Processes, port: int, site_tokens: dict[Site, str], setup: dict, gpu: bool
    ) -> None:
        environment = {**os.environ, "REDIS_URL": settings.REDIS_URL, "DEADLINE_CHECK_SECONDS": "5"}
        processes.start("web", daphne_command(port), environment)
        beat_schedule = settings.VAR_DIR / "celerybeat-schedule"
        processes.start(
            "worker", worker_command(beat_schedule=beat_schedule, log_level="warning"), environment
        )
        data_root = settings.VAR_DIR / "demo"
        for state_file in data_root.glob("state-*.json"):
            state_file.unlink()  # each run's hospitals start with a clean local memory
        for index, token in enumerate(site_tokens.values()):
            data = data_root / f"site-{index + 1}"
            self._synthesise(data, style=index, setup=setup)
            # One CPU thread per agent: N agents sharing the cores beat N agents fighting over them.
            threads = str(max(1, (os.cpu_count() or 1) // len(site_tokens)))
            agent_env = {
                **environment,
                "SITE_TOKEN": token,
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
            }
            processes.start(
                f"site {index + 1}",
                agent_command(
                    f"http://127.0.0.1:{port}",
                    data,
                    state_file=data_root / f"state-{index + 1}.json",
                    device="cuda" if gpu else "cpu",
                    max_epsilon=DEMO_BUDGET,
                ),
                agent_env,
            )

    def _synthesise(self, folder: Path, *, style: int, setup: dict) -> None:
        if folder.exists() and len([p for p in folder.iterdir() if p.is_dir()]) >= setup["cases"]:
            return
        self.stdout.write(
            f"Writing {setup['cases']} synthetic cases for site {style + 1} (scanner style {style})..."
        )
        write_synthetic_cases(folder, setup["cases"], seed=100 + style, style=style, size=setup["size"])

    # --- following the rounds ---------------------------------------------------------------

    def _follow(self, first: Round, count: int, processes: Processes) -> str | None:
        """Print a line per finished round; return why it stopped early, if it did."""
        numbers = range(first.number, first.number + count)
        started = time.monotonic()
        for number in numbers:
            while True:
                round_ = Round.objects.filter(federation=first.federation, number=number).first()
                if round_ is not None and round_.state == RoundState.DONE:
                    self.stdout.write(round_line(round_, time.monotonic() - started))
                    started = time.monotonic()
                    break
                if round_ is not None and round_.state in (RoundState.FAILED, RoundState.ABORTED):
                    return f"round {number} {round_.state}: {round_.failure_reason}"
                if round_ is None and time.monotonic() - started > 60:
                    return f"round {number} was not launched (see the audit log: a site may be out of budget)"
                if not processes.all_alive():
                    return f"a demo process stopped: {processes.first_dead()}"
                if time.monotonic() - started > ROUND_TIMEOUT_SECONDS:
                    return f"round {number} did not finish within {ROUND_TIMEOUT_SECONDS} s"
                time.sleep(0.5)
        return None


def round_line(round_: Round, seconds: float) -> str:
    """One line per finished round: number, contributing sites, federated mean Dice, epsilon spent."""
    contributed = sorted(round_.tasks.filter(state="uploaded").values_list("site__name", flat=True))
    series = charts.federated_dice(selectors.dice_points(round_.federation, round_=round_))["dice_mean"]
    dice_text = f"{series[0][1]:.3f}" if series else "n/a"
    if round_.dp_event is None:
        epsilon = "no formal guarantee"
    else:
        spent = [accounting.membership_balance(m) for m in round_.federation.memberships.all()]
        most = max((b.committed + b.reserved for b in spent), default=0)
        epsilon = (
            f"{accounting.show(round_.epsilon_per_site)} this round, up to {accounting.show(most)} per "
            f"site committed or reserved (delta {round_.federation.budget_delta:g})"
        )
    return (
        f"round {round_.number}: {len(contributed)} site(s) contributed ({', '.join(contributed)}); "
        f"federated mean Dice of its base model {dice_text}; epsilon spent {epsilon}; {seconds:.0f} s"
    )


class Processes:
    """The demo's child processes, by name; each stops with everything it started."""

    def __init__(self, stdout):
        self.stdout = stdout
        self.children: dict[str, ChildProcess] = {}
        self.logs = settings.VAR_DIR / "demo-logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str], environment: dict[str, str]) -> None:
        log_path = self.logs / f"{name.replace(' ', '-')}.log"
        self.children[name] = ChildProcess(command, log_path, environment)
        self.stdout.write(f"started {name} (pid {self.children[name].pid}, log {log_path})")

    def all_alive(self) -> bool:
        return all(child.alive() for child in self.children.values())

    def first_dead(self) -> str:
        for name, child in self.children.items():
            if not child.alive():
                return f"{name} exited with {child.process.returncode}; see {child.log_path}"
        return "none"

    def stop_all(self) -> None:
        for child in self.children.values():
            child.stop(timeout=15)
