"""Round overhead: what a round costs the coordinator when the agents do no training at all.

    .venv/bin/python bench/round_overhead.py [--agents 13 100] [--rounds 5] [--model tiny]
        [--pickup push|poll] [--poll-seconds 1] [--database sqlite|postgres] [--redis-url URL]
        [--json PATH]

A throwaway coordinator (fresh database, its own embedded Redis unless --redis-url, production
settings with DEBUG off) runs as in production: ``daphne coordinator.asgi:application`` and one
``celery -A coordinator worker -B`` process. For each fleet size, simulated agents (asyncio, one
httpx client and one agent websocket each, in this process) play rounds:

1. the coordinator launches a round over the API (``POST /api/federations/<id>/rounds/``, as the
   dashboard's launch button does);
2. each agent learns of it by push on ``/ws/agent/`` ("task.assigned" or "round.state"; with
   ``--pickup poll`` by polling instead) and fetches ``GET /api/agent/task/``:
   **launch -> every agent holds its task** is measured up to the last agent's answer;
3. each agent reports evaluating and training (as the real agent does; not timed) and uploads a
   precomputed valid SVT update of the federation's model size (``PUT .../update/``);
4. the worker aggregates; each agent hears "round.state: done" on its websocket, and the first
   agent to hear it fetches the round and downloads the new version's weights:
   **last upload answered -> version downloaded** is measured up to the end of that download.

Floors, measured on the same servers in the same run:

- notify floor: the channel layer pushes a probe to every agent's site group, and each agent
  answers with one trivial Django request (``GET /healthz``): the messages a launch cannot avoid,
  without any database work;
- upload floor: every agent sends its update again (the idempotent retry path: the coordinator
  reads and hashes the bytes and finds the stored update);
- aggregation floor: in this process, decoding the round's updates, ``aggregate`` and writing the
  version's bytes, with no database, broker, or network.

Every figure is the median over ``--rounds`` rounds, after one warm-up round reported apart.
The worker's log gives where the time after the last upload goes (queue, task run).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import _common  # puts the repository on sys.path, so it comes before coordinator and sitesagent
import httpx
import torch
from websockets.asyncio.client import ClientConnection, connect

from sitesagent import protocol
from sitesagent.model import preset

# sitesagent.model's presets: "tiny" is what the tests use (27,559 parameters).
MODELS = {
    "tiny": preset("tiny").to_dict(),
    "small": preset("cpu").to_dict(),
    "brats": preset("brats").to_dict(),
}
SVT_PARAMS = protocol.DEFAULT_SVT_PARAMS  # a federation's default; only its sizes matter here
N_ITERATIONS = 2
DISTINCT_UPDATES = 8  # agents share this many different update files; the bytes do not matter
WAIT_SECONDS = 120.0
AGGREGATE_LOG = re.compile(
    r"^\[(?P<at>[\d-]+ [\d:,]+): INFO/[^\]]+\] Task coordinator\.tasks\.round_aggregate_task\[(?P<id>[^\]]+)\] "
    r"(?P<what>received|succeeded in (?P<seconds>[\d.e-]+)s)",
    re.MULTILINE,
)


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"machine": _common.machine(), "settings": vars(arguments).copy()}
    print(f"# {_common.machine_line(results['machine'])}", flush=True)
    with _common.throwaway_coordinator(database=arguments.database, redis_url=arguments.redis_url) as server:
        server.start_daphne()
        worker = server.start_worker()
        coordinator_user, user_token = create_coordinator()
        results["fleets"] = []
        for count in arguments.agents:
            fleet = create_federation(coordinator_user, count, MODELS[arguments.model])
            fleet.updates = make_updates(fleet.n_parameters, min(count, DISTINCT_UPDATES))
            measured = asyncio.run(measure_fleet(server.url, user_token, fleet, arguments, worker))
            measured["aggregation_floor"] = aggregation_floor(fleet, arguments.rounds)
            results["fleets"].append(measured)
            report_fleet(measured)
    results["machine"]["load_average_after"] = _common.load_average()
    _common.write_json(arguments.json, results)


def parse_arguments():
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--agents", type=int, nargs="+", default=[13, 100])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per fleet (after one warm-up)")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--pickup", choices=["push", "poll"], default="push")
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--redis-url", default="", help="a Redis server; default: an embedded one of its own")
    return parser.parse_args()


# --- the federation (Django, in this process, before any event loop runs) ---------------------


@dataclass
class Fleet:
    federation_id: int
    n_parameters: int
    sites: list[tuple[int, str]]  # (site id, token)
    updates: list[bytes] = field(default_factory=list)


def create_coordinator():
    from django.contrib.auth import get_user_model

    from coordinator import services

    user = get_user_model().objects.create_user("alice", password=secrets.token_urlsafe(16), is_staff=True)
    return user, services.personal_token_create(user=user, name="benchmark")


def create_federation(user, count: int, model_config: dict) -> Fleet:
    from coordinator import services

    federation = services.federation_create(
        name=f"benchmark, {count} sites",
        created_by=user,
        model_config=model_config,
        default_mechanism_params=SVT_PARAMS,
        min_sites=count,
        training_defaults={"local_epochs": 0, "max_iterations": N_ITERATIONS, "roi_size": 16},
    )
    sites = []
    for index in range(count):
        site, token = services.site_register(name=f"site {count}-{index}", registered_by=user)
        membership = services.membership_add(
            federation=federation, site=site, budget=1_000_000, added_by=user, reason="benchmark"
        )
        services.membership_accept(membership=membership, accepted_by=user)  # its registrant
        sites.append((site.pk, token))
    initial = federation.latest_version()
    assert initial is not None  # federation_create stores version 0
    return Fleet(federation.pk, initial.n_parameters, sites)


def make_updates(n_parameters: int, count: int) -> list[bytes]:
    """Valid SVT updates as an agent makes them (per-step delta -> svt -> times N_k -> encode)."""
    from sitesagent.privacy import svt
    from sitesagent.updates import encode_update

    updates = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        per_step = torch.randn(n_parameters, generator=generator) * SVT_PARAMS["gamma"]
        indices, values = svt(per_step, **SVT_PARAMS, generator=generator)
        updates.append(
            encode_update(
                indices=indices,
                values=values * N_ITERATIONS,
                n_parameters=n_parameters,
                n_iterations=N_ITERATIONS,
                n_cases=10,
                mechanism=protocol.MECHANISM_SVT,
                params=SVT_PARAMS,
            )
        )
    return updates


# --- simulated agents ------------------------------------------------------------------------


@dataclass
class SimulatedAgent:
    """An agent that trains nothing: it only moves the messages a real one moves."""

    site_id: int
    http: httpx.AsyncClient
    socket: ClientConnection
    update: bytes
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    last_round: int = 0
    listener: asyncio.Task | None = None

    async def listen(self) -> None:
        async for raw in self.socket:
            self.inbox.put_nowait((time.perf_counter(), json.loads(raw)))

    async def next_message(self, wanted) -> float:
        """When the first message ``wanted(message)`` accepts arrived (older ones are dropped)."""
        while True:
            arrived, message = await asyncio.wait_for(self.inbox.get(), WAIT_SECONDS)
            if wanted(message):
                return arrived

    def is_new_round(self, message: dict) -> bool:
        # The real agent wakes on either; both are sent when a round is launched.
        return (
            message.get("type") in ("task.assigned", "round.state")
            and message.get("round", 0) > self.last_round
        )

    async def take_task(self, pickup: str, poll_seconds: float) -> dict[str, Any]:
        if pickup == "push":
            notified = await self.next_message(self.is_new_round)
            task = await self.fetch_task()
        else:
            notified = None
            await asyncio.sleep(poll_seconds * _uniform())  # agents poll out of phase
            while (task := await self.fetch_task()) is None or task["round"] <= self.last_round:
                await asyncio.sleep(poll_seconds)
        if task is None:
            raise RuntimeError(f"site {self.site_id} was told of a round but has no task")
        return {"task": task, "notified": notified, "holding": time.perf_counter()}

    async def fetch_task(self) -> dict[str, Any] | None:
        response = await self.http.get("/api/agent/task/")
        response.raise_for_status()
        return None if response.status_code == 204 else response.json()

    async def report(self, task_id: int, state: str) -> None:
        response = await self.http.post(f"/api/agent/tasks/{task_id}/status/", json={"state": state})
        response.raise_for_status()

    async def upload(self, task_id: int) -> dict[str, float]:
        sent = time.perf_counter()
        response = await self.http.put(
            f"/api/agent/tasks/{task_id}/update/",
            content=self.update,
            headers={"Content-Type": "application/octet-stream"},
        )
        if response.status_code != 200:
            raise RuntimeError(f"upload refused: {response.status_code} {response.text[:300]}")
        return {"sent": sent, "answered": time.perf_counter(), "answered_wall": time.time()}

    async def close(self) -> None:
        if self.listener:
            self.listener.cancel()
        await self.socket.close()
        await self.http.aclose()


def _uniform() -> float:
    return secrets.randbelow(1_000_000) / 1_000_000


async def connect_agents(url: str, fleet: Fleet) -> list[SimulatedAgent]:
    async def one(index: int, site_id: int, token: str) -> SimulatedAgent:
        headers = {"Authorization": f"Bearer {token}"}
        http = httpx.AsyncClient(base_url=url, headers=headers, timeout=WAIT_SECONDS)
        socket = await connect(url.replace("http", "ws", 1) + "/ws/agent/", additional_headers=headers)
        agent = SimulatedAgent(site_id, http, socket, fleet.updates[index % len(fleet.updates)])
        agent.listener = asyncio.create_task(agent.listen())
        return agent

    return list(await asyncio.gather(*(one(i, *site) for i, site in enumerate(fleet.sites))))


# --- one round -------------------------------------------------------------------------------


async def play_round(
    agents: list[SimulatedAgent], coordinator: httpx.AsyncClient, fleet: Fleet, arguments
) -> dict[str, Any]:
    """One round, launch to downloaded version; every time relative to this process's clock."""
    launch = await launch_and_pick_up(agents, coordinator, fleet, arguments)
    tasks = launch.pop("tasks")
    for state in (protocol.TASK_EVALUATING, protocol.TASK_TRAINING):
        await asyncio.gather(*(a.report(t["task"], state) for a, t in zip(agents, tasks, strict=True)))
    uploads = await asyncio.gather(*(a.upload(t["task"]) for a, t in zip(agents, tasks, strict=True)))
    finish = await wait_for_version(agents, coordinator, launch["round"], uploads)
    finish["upload_retry_all_s"] = await upload_again(agents, tasks)
    for agent in agents:
        agent.last_round = launch["round"]
    return {**launch, **finish}


async def launch_and_pick_up(
    agents: list[SimulatedAgent], coordinator: httpx.AsyncClient, fleet: Fleet, arguments
) -> dict[str, Any]:
    """Launch over the API while every agent waits for its task (push or poll)."""
    launched = time.perf_counter()
    launch = asyncio.create_task(timed_post(coordinator, f"/api/federations/{fleet.federation_id}/rounds/"))
    holdings = await asyncio.gather(*(a.take_task(arguments.pickup, arguments.poll_seconds) for a in agents))
    response, launch_answered = await launch
    if response.status_code != 201:
        raise RuntimeError(f"launch refused: {response.status_code} {response.text[:300]}")
    round_id = response.json()["id"]
    tasks = [holding["task"] for holding in holdings]
    if any(task["round"] != round_id for task in tasks):
        raise RuntimeError("an agent holds a task of another round")
    pushed = arguments.pickup == "push"
    return {
        "round": round_id,
        "tasks": tasks,
        "launch_answered_s": launch_answered - launched,
        "all_notified_s": max(h["notified"] for h in holdings) - launched if pushed else None,
        "all_holding_task_s": max(h["holding"] for h in holdings) - launched,
    }


async def wait_for_version(
    agents: list[SimulatedAgent], coordinator: httpx.AsyncClient, round_id: int, uploads: list[dict]
) -> dict[str, Any]:
    """From the last upload's answer until the round reads done and an agent downloaded the version.

    Agents are not told a round is done (they only hear of new tasks), so this asks the API as a
    dashboard's reload would, every 10 ms.
    """
    last_upload = max(upload["answered"] for upload in uploads)
    while (await coordinator.get(f"/api/rounds/{round_id}/")).json()["state"] not in ("done", "failed"):
        await asyncio.sleep(0.01)
    done_seen = time.perf_counter()
    weights_bytes = await download_result(coordinator, agents[0], round_id)
    downloaded = time.perf_counter()
    return {
        "upload_phase_s": last_upload - min(upload["sent"] for upload in uploads),
        "done_seen_s": done_seen - last_upload,
        "version_downloaded_s": downloaded - last_upload,
        "weights_bytes": weights_bytes,
        # Wall-clock times, to place the worker's log lines between them.
        "last_upload_wall": max(upload["answered_wall"] for upload in uploads),
        "done_seen_wall": time.time() - (downloaded - done_seen),
    }


async def timed_post(client: httpx.AsyncClient, path: str) -> tuple[httpx.Response, float]:
    response = await client.post(path, json={})
    return response, time.perf_counter()


async def download_result(coordinator: httpx.AsyncClient, agent: SimulatedAgent, round_id: int) -> int:
    detail = (await coordinator.get(f"/api/rounds/{round_id}/")).json()
    if detail["state"] != "done" or detail["result_version"] is None:
        raise RuntimeError(f"round {round_id} ended {detail['state']}: {detail.get('failure_reason')}")
    response = await agent.http.get(f"/api/versions/{detail['result_version']}/weights/")
    response.raise_for_status()
    return len(response.content)


async def upload_again(agents: list[SimulatedAgent], tasks: list[dict]) -> float:
    """Upload floor: every agent retries its upload; the coordinator hashes it and finds it stored."""
    started = time.perf_counter()
    await asyncio.gather(*(a.upload(t["task"]) for a, t in zip(agents, tasks, strict=True)))
    return time.perf_counter() - started


# --- floors ----------------------------------------------------------------------------------


async def notify_floor(agents: list[SimulatedAgent]) -> float:
    """A probe pushed to every site group at once, each agent answering with GET /healthz."""
    from channels.layers import get_channel_layer

    from coordinator import events

    layer = get_channel_layer()
    probe = {"type": "task.assigned", "round": -1, "state": "probe"}

    async def answer(agent: SimulatedAgent) -> float:
        await agent.next_message(lambda message: message.get("state") == "probe")
        (await agent.http.get("/healthz")).raise_for_status()
        return time.perf_counter()

    answers = [asyncio.create_task(answer(agent)) for agent in agents]
    started = time.perf_counter()
    await asyncio.gather(
        *(
            layer.group_send(events.site_group(a.site_id), {"type": "event.forward", "event": probe})
            for a in agents
        )
    )
    return max(await asyncio.gather(*answers)) - started


def aggregation_floor(fleet: Fleet, runs: int) -> dict[str, Any]:
    """The arithmetic after the last upload, in-process: decode every update, aggregate, serialise."""
    from coordinator import weights
    from coordinator.aggregation import aggregate
    from sitesagent.updates import decode_update

    blobs = [fleet.updates[i % len(fleet.updates)] for i in range(len(fleet.sites))]
    base_state = weights.bytes_to_state(weights.initial_weights(_model_config(fleet), 0))
    base = weights.flatten(base_state)

    def work() -> bytes:
        updates = [decode_update(blob) for blob in blobs]
        flat = aggregate(base, updates, device="cpu")
        return weights.state_to_bytes(weights.unflatten(flat, base_state))

    return _common.summary(_common.time_runs(work, max(runs, 3)))


def _model_config(fleet: Fleet) -> dict:
    from coordinator.models import Federation

    return Federation.objects.get(pk=fleet.federation_id).model_config


# --- the worker's side -----------------------------------------------------------------------


def worker_timeline(worker: _common.ChildProcess, round_result: dict[str, Any]) -> dict[str, float] | None:
    """From the worker log: upload -> task received, the task's run, received -> first agent hears done."""
    entries: dict[str, dict[str, Any]] = {}
    for match in AGGREGATE_LOG.finditer(worker.output()):
        entry = entries.setdefault(match["id"], {})
        at = datetime.datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if match["what"] == "received":
            entry["received"] = at
        else:
            entry["run_s"] = float(match["seconds"])
    candidates = [
        e
        for e in entries.values()
        if "received" in e and e["received"] >= round_result["last_upload_wall"] - 0.05
    ]
    if not candidates:
        return None
    entry = min(candidates, key=lambda e: e["received"])
    return {
        # Negative when the last upload's own request enqueued the task before its answer left.
        "received_after_last_upload_s": entry["received"] - round_result["last_upload_wall"],
        "task_run_s": entry.get("run_s", float("nan")),
        "received_to_done_seen_s": round_result["done_seen_wall"] - entry["received"],
    }


# --- one fleet -------------------------------------------------------------------------------


async def measure_fleet(url: str, user_token: str, fleet: Fleet, arguments, worker) -> dict[str, Any]:
    agents = await connect_agents(url, fleet)
    coordinator = httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {user_token}"}, timeout=WAIT_SECONDS
    )
    rounds = []
    floors = []
    try:
        for index in range(arguments.rounds + 1):
            played = await play_round(agents, coordinator, fleet, arguments)
            await asyncio.sleep(1.0)  # let the worker log its task's end before reading it
            played["worker"] = worker_timeline(worker, played)
            rounds.append(played)
            floors.append(await notify_floor(agents))
            print(
                f"  {len(agents)} agents, round {index}: holding {played['all_holding_task_s']:.3f} s, "
                f"downloaded {played['version_downloaded_s']:.3f} s after the last upload",
                file=sys.stderr,
                flush=True,
            )
    finally:
        await coordinator.aclose()
        await asyncio.gather(*(agent.close() for agent in agents))
    return summarise_fleet(fleet, rounds, floors, arguments)


def summarise_fleet(fleet: Fleet, rounds: list[dict], floors: list[float], arguments) -> dict[str, Any]:
    measured = rounds[1:]
    keys = [
        "launch_answered_s",
        "all_notified_s",
        "all_holding_task_s",
        "upload_phase_s",
        "upload_retry_all_s",
        "done_seen_s",
        "version_downloaded_s",
    ]
    summary = {
        key: _common.summary([r[key] for r in measured]) for key in keys if measured[0][key] is not None
    }
    for key in ("received_after_last_upload_s", "task_run_s", "received_to_done_seen_s"):
        values = [r["worker"][key] for r in measured if r["worker"]]
        if values:
            summary[f"worker_{key}"] = _common.summary(values)
    return {
        "agents": len(fleet.sites),
        "n_parameters": fleet.n_parameters,
        "update_bytes": len(fleet.updates[0]),
        "pickup": arguments.pickup,
        "warm_up_round": rounds[0],
        "rounds": measured,
        "notify_floor": _common.summary(floors[1:]),
        **summary,
    }


# --- report ----------------------------------------------------------------------------------


def report_fleet(fleet: dict[str, Any]) -> None:
    def ms(key: str) -> str:
        return f"{fleet[key]['median'] * 1e3:8.1f} ms" if key in fleet else "       -"

    print(
        f"\n{fleet['agents']} agents, {fleet['n_parameters']:,} parameters, updates of "
        f"{fleet['update_bytes']:,} bytes, pickup by {fleet['pickup']}, median of {len(fleet['rounds'])} rounds"
    )
    rows = [
        ("launch POST answered", "launch_answered_s"),
        ("launch -> every agent notified", "all_notified_s"),
        ("launch -> every agent holds its task", "all_holding_task_s"),
        ("  floor: push + one trivial request each", "notify_floor"),
        ("upload phase (first sent -> last answered)", "upload_phase_s"),
        ("  floor: the same uploads retried", "upload_retry_all_s"),
        ("last upload -> the API reads done", "done_seen_s"),
        ("last upload -> version downloaded", "version_downloaded_s"),
        ("  worker: last upload -> task received", "worker_received_after_last_upload_s"),
        ("  worker: the task's run", "worker_task_run_s"),
        ("  worker: received -> done seen", "worker_received_to_done_seen_s"),
        ("  floor: decode + aggregate + serialise", "aggregation_floor"),
    ]
    for label, key in rows:
        print(f"  {label:<46} {ms(key)}")
    holding, floor = fleet["all_holding_task_s"]["median"], fleet["notify_floor"]["median"]
    downloaded = fleet["version_downloaded_s"]["median"]
    print(
        f"  launch ratio to floor {holding / floor:.1f}x; after-upload ratio to floor "
        f"{downloaded / fleet['aggregation_floor']['median']:.1f}x"
    )


if __name__ == "__main__":
    main()
