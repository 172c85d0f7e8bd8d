"""Live metrics: how many messages one agent can stream over its websocket, and how long a point
takes from the agent's send to a dashboard's screen, with ten dashboards watching the round.

    .venv/bin/python bench/live_metrics.py [--dashboards 10] [--seconds 5] [--latency-rate 20]
        [--database sqlite|postgres] [--redis-url URL] [--json PATH]

A throwaway coordinator (fresh database, its own embedded Redis unless --redis-url, DEBUG off) is
served by ``daphne coordinator.asgi:application``. One site has a task in an open round; a
coordinator's ten browser sockets (``/ws/rounds/<id>/``, session cookie and Origin header, as a
browser sends them) listen. The agent speaks the protocol of ``sitesagent.client.LiveChannel``:
``{"type": "metrics", "task": id, "points": [...], "seq": n}``, answered by an ack.

- stop-and-wait: one point a message, the next sent when the ack is back: messages per second;
- pipelined: up to ``--window`` messages in flight: messages per second, one point each and 100
  points each (points per second);
- LiveChannel itself: 5,000 points through the real client (it batches every 0.2 s), timed until
  every dashboard has every point;
- latency: one point a message at ``--latency-rate`` messages per second, from the agent's send
  to each dashboard's receive: p50 and p95 over every (message, dashboard), and of the slowest
  dashboard per message.

Floor: the same client against daphne serving a bare ASGI app that parses each message and acks
it (no Django, no Channels, no database, no fan-out): the transport alone, stop-and-wait and
pipelined; its round-trip time is the latency floor (a point must cross two sockets). Also, in
this process: what ``services.metrics_record`` (insert + fan-out) costs per call.

Every figure is the median of ``--repeats`` runs; all clients run in this one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any

import _common  # puts the repository on sys.path, so it comes before coordinator and sitesagent
from websockets.asyncio.client import ClientConnection, connect

from sitesagent.model import preset

TINY_MODEL = preset("tiny").to_dict()
LIVE_CHANNEL_POINTS = 5_000
WAIT_SECONDS = 60.0

# The transport floor: daphne serving an app that does what the agent consumer does with a
# message, less the database and the fan-out: parse the JSON, answer an ack.
ACK_APP = textwrap.dedent(
    """
    import json


    async def application(scope, receive, send):
        if scope["type"] == "http":
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            content = json.loads(event["text"])
            reply = {"type": "ack", "stored": len(content["points"]), "seq": content["seq"]}
            await send({"type": "websocket.send", "text": json.dumps(reply)})
    """
)


def main() -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--dashboards", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--window", type=int, default=32, help="messages in flight when pipelined")
    parser.add_argument("--latency-rate", type=float, default=20.0, help="messages a second")
    parser.add_argument("--latency-messages", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--redis-url", default="")
    arguments = parser.parse_args()

    results: dict[str, Any] = {"machine": _common.machine(), "settings": vars(arguments).copy()}
    print(f"# {_common.machine_line(results['machine'])}", flush=True)
    with _common.throwaway_coordinator(database=arguments.database, redis_url=arguments.redis_url) as server:
        setup = create_round()
        setup["metrics_record_s"] = metrics_record_cost(setup["task_id"])
        server.start_daphne()
        setup["url"] = server.url
        results["coordinator"] = asyncio.run(measure_coordinator(setup, arguments))
        floor_url = start_ack_server(server)
        results["floor"] = asyncio.run(measure_floor(floor_url, arguments))
        results["metrics_record_in_process"] = _common.summary(setup["metrics_record_s"])
    results["machine"]["load_average_after"] = _common.load_average()
    report(results)
    _common.write_json(arguments.json, results)


# --- the round the metrics belong to (Django, before any event loop runs) ----------------------


def create_round() -> dict[str, Any]:
    """A coordinator (alice) signed in, one site with a task in an open round."""
    from django.contrib.auth import get_user_model

    from coordinator import services
    from coordinator.models import Task

    alice = get_user_model().objects.create_user("alice", password=secrets.token_urlsafe(16), is_staff=True)
    federation = services.federation_create(name="live metrics", created_by=alice, model_config=TINY_MODEL)
    site, token = services.site_register(name="site 1", registered_by=alice)
    membership = services.membership_add(
        federation=federation, site=site, budget=100, added_by=alice, reason="benchmark"
    )
    services.membership_accept(membership=membership, accepted_by=alice)  # alice registered the site
    round_ = services.round_launch(federation=federation, launched_by=alice)
    return {
        "round_id": round_.pk,
        "task_id": Task.objects.get(round=round_).pk,
        "site_token": token,
        "session_key": signed_in_session(alice),
    }


def signed_in_session(user) -> str:
    """A session as the login view leaves it, so a socket can present its cookie."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return str(session.session_key)


def metrics_record_cost(task_id: int, runs: int = 50) -> list[float]:
    """What storing and forwarding one point costs in this process, without daphne."""
    from coordinator import services
    from coordinator.models import MetricPoint, Task

    task = Task.objects.select_related("round", "site").get(pk=task_id)
    steps = itertools.count(-1_000_000)
    samples = _common.time_runs(
        lambda: services.metrics_record(task=task, points=[point(next(steps))]), runs, warmups=3
    )
    MetricPoint.objects.filter(step__lt=0).delete()
    return samples


def point(step: int) -> dict[str, Any]:
    return {"name": "train_loss", "step": step, "value": 0.5}


# --- sockets ---------------------------------------------------------------------------------


@dataclass
class Dashboard:
    """A browser's round page socket: records when each point (by step) arrived."""

    socket: ClientConnection
    received: dict[int, float] = field(default_factory=dict)
    reader: asyncio.Task | None = None

    async def read(self) -> None:
        async for raw in self.socket:
            message = json.loads(raw)
            if message.get("type") == "metrics":
                now = time.perf_counter()
                for item in message["points"]:
                    self.received.setdefault(item["step"], now)


async def open_dashboard(url: str, round_id: int, session_key: str) -> Dashboard:
    headers = {"Cookie": f"sessionid={session_key}", "Origin": url}
    socket = await connect(f"{ws_url(url)}/ws/rounds/{round_id}/", additional_headers=headers)
    dashboard = Dashboard(socket)
    dashboard.reader = asyncio.create_task(dashboard.read())
    return dashboard


@dataclass
class AgentSocket:
    """The agent's side of the live channel, with acks counted as they come back."""

    socket: ClientConnection
    task_id: int
    acks: int = 0
    errors: list[str] = field(default_factory=list)
    ack_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    sequence: itertools.count = field(default_factory=lambda: itertools.count(1))
    reader: asyncio.Task | None = None

    async def read(self) -> None:
        async for raw in self.socket:
            message = json.loads(raw)
            if message.get("type") == "ack":
                self.acks += 1
                self.ack_arrived.set()
            elif message.get("type") == "error":
                self.errors.append(message.get("error", ""))

    async def send(self, points: list[dict[str, Any]]) -> None:
        message = {"type": "metrics", "task": self.task_id, "points": points, "seq": next(self.sequence)}
        await self.socket.send(json.dumps(message))

    async def wait_acks(self, count: int) -> None:
        while self.acks < count:
            self.ack_arrived.clear()
            await asyncio.wait_for(self.ack_arrived.wait(), WAIT_SECONDS)
            if self.errors:
                raise RuntimeError(f"the coordinator refused metrics: {self.errors[0]}")


async def open_agent(url: str, token: str, task_id: int) -> AgentSocket:
    headers = {"Authorization": f"Bearer {token}"}
    agent = AgentSocket(await connect(f"{ws_url(url)}/ws/agent/", additional_headers=headers), task_id)
    agent.reader = asyncio.create_task(agent.read())
    return agent


def ws_url(url: str) -> str:
    return url.replace("http", "ws", 1)


async def close_all(*sockets) -> None:
    for item in sockets:
        if item.reader:
            item.reader.cancel()
        with contextlib.suppress(Exception):
            await item.socket.close()


# --- measurements ----------------------------------------------------------------------------


class Steps:
    """Unique steps across every run, so a dashboard can tell each point apart."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def take(self, count: int) -> list[int]:
        return [next(self._counter) for _ in range(count)]


async def stop_and_wait(agent: AgentSocket, steps: Steps, seconds: float) -> float:
    """Messages a second, one point each, each sent only when the one before is acked."""
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await agent.send([point(steps.take(1)[0])])
        sent += 1
        await agent.wait_acks(agent.acks + 1)
    return sent / (time.perf_counter() - start)


async def pipelined(agent: AgentSocket, steps: Steps, seconds: float, window: int, per_message: int) -> float:
    """Messages a second with up to ``window`` unacknowledged at a time."""
    first_ack = agent.acks
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if sent - (agent.acks - first_ack) >= window:
            await agent.wait_acks(agent.acks + 1)
            continue
        await agent.send([point(step) for step in steps.take(per_message)])
        sent += 1
    await agent.wait_acks(first_ack + sent)
    return sent / (time.perf_counter() - start)


async def paced_latency(
    agent: AgentSocket, dashboards: list[Dashboard], steps: Steps, rate: float, count: int
) -> dict[str, Any]:
    """Send one point every 1/rate seconds; the latency is each dashboard's receive minus the send."""
    sent_at: dict[int, float] = {}
    start = time.perf_counter()
    for index, step in enumerate(steps.take(count)):
        await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
        sent_at[step] = time.perf_counter()
        await agent.send([point(step)])
    await wait_until(lambda: all(step in d.received for d in dashboards for step in sent_at), WAIT_SECONDS)
    every = [d.received[step] - sent_at[step] for d in dashboards for step in sent_at]
    slowest = [max(d.received[step] for d in dashboards) - sent_at[step] for step in sent_at]
    return {
        "p50_s": _common.percentile(every, 0.5),
        "p95_s": _common.percentile(every, 0.95),
        "slowest_dashboard_p50_s": _common.percentile(slowest, 0.5),
        "slowest_dashboard_p95_s": _common.percentile(slowest, 0.95),
        "samples": len(every),
    }


async def wait_until(condition, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("the dashboards did not receive every point")
        await asyncio.sleep(0.005)


async def live_channel_points_per_second(setup: dict[str, Any], dashboards: list[Dashboard], steps: Steps):
    """The real client: points a second from the first send to the last dashboard's receive."""
    from sitesagent.client import Client, LiveChannel

    client = Client(setup["url"], setup["site_token"])
    channel = LiveChannel(client).start()
    try:
        await asyncio.to_thread(channel.connected.wait, WAIT_SECONDS)
        wanted = steps.take(LIVE_CHANNEL_POINTS)
        start = time.perf_counter()
        for step in wanted:
            channel.send(setup["task_id"], "train_loss", step, 0.5)
        await wait_until(lambda: all(wanted[-1] in d.received for d in dashboards), WAIT_SECONDS)
        await wait_until(lambda: all(all(s in d.received for s in wanted) for d in dashboards), WAIT_SECONDS)
        return LIVE_CHANNEL_POINTS / (time.perf_counter() - start)
    finally:
        await asyncio.to_thread(channel.stop)
        client.close()


async def measure_coordinator(setup: dict[str, Any], arguments) -> dict[str, Any]:
    url = setup["url"]
    dashboards = [
        await open_dashboard(url, setup["round_id"], setup["session_key"])
        for _ in range(arguments.dashboards)
    ]
    agent = await open_agent(url, setup["site_token"], setup["task_id"])
    steps = Steps()
    runs: dict[str, list[float]] = {
        "stop_and_wait_messages_per_s": [],
        "pipelined_messages_per_s": [],
        "pipelined_100_points_messages_per_s": [],
        "live_channel_points_per_s": [],
    }
    latencies = []
    try:
        for repeat in range(arguments.repeats):
            runs["stop_and_wait_messages_per_s"].append(await stop_and_wait(agent, steps, arguments.seconds))
            runs["pipelined_messages_per_s"].append(
                await pipelined(agent, steps, arguments.seconds, arguments.window, 1)
            )
            runs["pipelined_100_points_messages_per_s"].append(
                await pipelined(agent, steps, arguments.seconds, arguments.window, 100)
            )
            if dashboards:  # both are timed to the dashboards' receive
                runs["live_channel_points_per_s"].append(
                    await live_channel_points_per_second(setup, dashboards, steps)
                )
                latencies.append(
                    await paced_latency(
                        agent, dashboards, steps, arguments.latency_rate, arguments.latency_messages
                    )
                )
            print(f"  coordinator, repeat {repeat} measured", file=sys.stderr, flush=True)
    finally:
        await close_all(agent, *dashboards)
    summary = {name: _common.summary(values) for name, values in runs.items() if values}
    for key in ("p50_s", "p95_s", "slowest_dashboard_p50_s", "slowest_dashboard_p95_s"):
        if latencies:
            summary[f"latency_{key}"] = _common.summary([run[key] for run in latencies])
    summary["dashboards"] = arguments.dashboards
    return summary


# --- the transport floor ---------------------------------------------------------------------


def start_ack_server(server: _common.Coordinator) -> str:
    """daphne serving ACK_APP on a port of its own; stopped with the coordinator's processes."""
    (server.workdir / "ack_app.py").write_text(ACK_APP)
    port = _common.free_port()
    environment = {**server.environment, "PYTHONPATH": str(server.workdir)}
    command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "ack_app:application"]
    process = _common.ChildProcess(command, server.workdir / "ack-daphne.log", environment)
    server.processes.append(process)
    url = f"http://127.0.0.1:{port}"
    process.wait_until_http_ok(f"{url}/healthz", timeout=60)
    return url


async def measure_floor(url: str, arguments) -> dict[str, Any]:
    agent = AgentSocket(await connect(f"{ws_url(url)}/"), task_id=0)
    agent.reader = asyncio.create_task(agent.read())
    steps = Steps()
    runs: dict[str, list[float]] = {"stop_and_wait_messages_per_s": [], "pipelined_messages_per_s": []}
    try:
        for _ in range(arguments.repeats):
            runs["stop_and_wait_messages_per_s"].append(await stop_and_wait(agent, steps, arguments.seconds))
            runs["pipelined_messages_per_s"].append(
                await pipelined(agent, steps, arguments.seconds, arguments.window, 1)
            )
    finally:
        await close_all(agent)
    summary = {name: _common.summary(values) for name, values in runs.items()}
    summary["round_trip_s"] = 1 / summary["stop_and_wait_messages_per_s"]["median"]
    return summary


# --- report ----------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    ours, floor = results["coordinator"], results["floor"]

    def rate(block: dict, key: str) -> float:
        return block[key]["median"]

    print(
        f"\none agent, {ours['dashboards']} dashboards on the round page, median of {results['settings']['repeats']} runs"
    )
    print(f"{'':<44} {'ours':>10} {'floor':>10} {'of floor':>9}")
    for label, key in (
        ("stop-and-wait, messages/s", "stop_and_wait_messages_per_s"),
        ("pipelined, messages/s", "pipelined_messages_per_s"),
    ):
        print(
            f"{label:<44} {rate(ours, key):>10.0f} {rate(floor, key):>10.0f} {rate(ours, key) / rate(floor, key):>9.0%}"
        )
    per_100 = rate(ours, "pipelined_100_points_messages_per_s")
    print(
        f"{'pipelined, 100 points a message, messages/s':<44} {per_100:>10.0f}   ({per_100 * 100:,.0f} points/s)"
    )
    record = results["metrics_record_in_process"]["median"] * 1e3
    print(f"services.metrics_record in this process: {record:.2f} ms a call")
    if "live_channel_points_per_s" not in ours:
        return
    print(f"{'LiveChannel (0.2 s batches), points/s':<44} {rate(ours, 'live_channel_points_per_s'):>10.0f}")
    floor_ms = floor["round_trip_s"] * 1e3
    print(f"\nlatency, agent send -> dashboard receive, {results['settings']['latency_rate']:g} messages/s:")
    for label, key in (
        ("p50, every dashboard", "latency_p50_s"),
        ("p95, every dashboard", "latency_p95_s"),
        ("p50, slowest of the dashboards", "latency_slowest_dashboard_p50_s"),
        ("p95, slowest of the dashboards", "latency_slowest_dashboard_p95_s"),
    ):
        value = ours[key]["median"] * 1e3
        print(f"  {label:<34} {value:>8.1f} ms  ({value / floor_ms:.1f}x the floor)")
    print(f"  floor: one round trip to a bare ASGI app  {floor_ms:>8.2f} ms")


if __name__ == "__main__":
    main()
