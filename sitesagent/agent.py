"""The agent loop: the client moves messages, the training code trains, and this joins them.

One task, start to finish (DESIGN section 5):
  refuse it if the site's own rules forbid it -> download the base model -> evaluate it on the
  validation cases -> train -> delta / N_k -> privacy mechanism -> values * N_k -> remember the
  spend and the bytes -> upload (retried; the coordinator commits epsilon once).
"""

from __future__ import annotations

import inspect
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sitesagent import protocol
from sitesagent.client import BEST_EFFORT_ATTEMPTS, Client, CoordinatorError, LiveChannel
from sitesagent.state import AgentState, LocalCapExceeded

log = logging.getLogger("sitesagent")


@dataclass
class AgentConfig:
    server: str
    token: str
    data: Path
    device: str = "auto"
    max_epsilon: float | None = None
    delta: float = 1e-5  # the delta the site's cap is stated at
    # The site's policy, enforced whatever the coordinator says (None: no restriction).
    max_round_epsilon: float | None = None  # the most one round may cost, at delta
    federations: tuple[str, ...] | None = None  # the only federations served, by name
    mechanisms: tuple[str, ...] | None = None  # the only mechanisms accepted
    allow_unprotected: bool = False

    def policy(self) -> dict[str, Any]:
        """The site's own rules, as the agent reports them to the coordinator."""
        return {
            "max_epsilon": self.max_epsilon,
            "max_round_epsilon": self.max_round_epsilon,
            "delta": self.delta,
            "federations": list(self.federations) if self.federations is not None else None,
            "mechanisms": list(self.mechanisms) if self.mechanisms is not None else None,
            "allow_unprotected": self.allow_unprotected,
        }

    state_file: Path | None = None
    poll_seconds: float = 10.0
    progress_bar: bool = True
    seed: int = 0


class TaskRefused(Exception):
    """The site's own rules forbid this task; the reason goes back to the coordinator."""


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.client = Client(config.server, config.token)
        self.state = AgentState.load(config.state_file or config.data / ".sitesagent-state.json")
        self.channel = LiveChannel(self.client)
        self._dataset: Any = None

    # --- the loop -----------------------------------------------------------------------

    def run(self, *, once: bool = False) -> int:
        from sitesagent.data import DataError

        try:
            self._dataset = self._load_dataset()
        except DataError as error:
            log.error("the site's data cannot be used: %s", error)
            return 2
        self.channel.start()
        try:
            self.client.heartbeat(self._describe())
            if self._resend_pending_uploads() and once:
                return 0
            while True:
                task = self.client.next_task()
                outcome = "idle" if task is None else self.run_task(task)
                if outcome in ("idle", "refused", "already released"):
                    # Nothing to do, or a task this site will not (re)run: wait before asking again.
                    self.channel.task_waiting.wait(timeout=self.config.poll_seconds)
                    self.channel.task_waiting.clear()
                if once and outcome != "idle":
                    return 0
        except KeyboardInterrupt:
            log.info("stopped; an unfinished task resumes when the agent starts again")
            return 130
        finally:
            self.channel.stop()
            self.client.close()

    def _resend_pending_uploads(self) -> int:
        """Send again what a crash interrupted. The coordinator may already hold it (only the
        answer was lost): it recognises the same bytes and commits nothing twice."""
        pending = self.state.pending_uploads()
        for task_id, update_file in pending:
            log.info("task %s: re-sending the update an earlier run did not see acknowledged", task_id)
            self._upload(task_id, update_file)
        return len(pending)

    def run_task(self, task: dict[str, Any]) -> str:
        task_id = task["task"]
        if self.state.task(task_id).get("status") == "uploaded":
            # An update for this task already left: training it again would release more than the
            # one round the coordinator accounts for, whatever it says.
            log.warning("task %s was offered again, but this site already released its update", task_id)
            return "already released"
        try:
            event = self._check_site_rules(task)
        except TaskRefused as refusal:
            log.warning("refusing task %s: %s", task_id, refusal)
            self.state.record_refused(task_id, str(refusal))
            self._drop(task_id, f"refused by the site: {refusal}")
            return "refused"
        update_file = self._update_file(task_id)
        if self.state.task(task_id).get("status") != "pending_upload" or not update_file.exists():
            try:
                data = self._train_and_protect(task)
            except (ConnectionError, KeyboardInterrupt):
                raise  # the task stays open: the agent resumes it when it can reach the coordinator
            except Exception as error:  # noqa: BLE001 - one failed task must not stop the agent
                log.exception("task %s failed", task_id)
                self.state.record_failed(task_id, str(error))
                self._drop(task_id, f"the site could not finish the task: {error}")
                return "failed"
            update_file.parent.mkdir(parents=True, exist_ok=True)
            update_file.write_bytes(data)
            self.state.record_pending_upload(task_id, event=event, update_file=update_file)
        return self._upload(task_id, update_file)

    def _drop(self, task_id: int, reason: str) -> None:
        try:
            self.client.report(task_id, protocol.TASK_DROPPED, reason=reason[:1000])
        except CoordinatorError as error:
            log.warning("could not report task %s as dropped: %s", task_id, error.message)

    def _check_site_rules(self, task: dict[str, Any]) -> dict[str, Any] | None:
        """The task's DP event as this site computes it, or TaskRefused saying why it will not run.

        The cost comes from the mechanism and parameters the agent will apply, never from the
        figure the coordinator states; a stated cost that disagrees, or none for a protected
        mechanism, is itself a reason to refuse.
        """
        config = self.config
        mechanism, params = task.get("mechanism"), task.get("mechanism_params")
        if config.federations is not None and task.get("federation") not in config.federations:
            raise TaskRefused(
                f"the task is for federation {task.get('federation')!r}, and this site serves only "
                f"{', '.join(config.federations)} (--federations)"
            )
        if config.mechanisms is not None and mechanism not in config.mechanisms:
            raise TaskRefused(
                f"the round uses {mechanism!r}, and this site accepts only {', '.join(config.mechanisms)} "
                "(--mechanisms)"
            )
        try:
            spec = protocol.mechanism_spec(mechanism)
            event = protocol.round_event(spec.name, params or {})
        except protocol.ProtocolError as error:
            raise TaskRefused(f"the round's mechanism cannot be applied: {error}") from None
        if not spec.has_guarantee and not self.config.allow_unprotected:
            raise TaskRefused(
                f"the round uses {mechanism!r}, which has no formal privacy guarantee, and this "
                "site does not allow unprotected sharing (--allow-unprotected)"
            )
        if event is not None:
            self._check_stated_cost(task, event)
            self._check_round_cost(event)
        if self.state.task(task["task"]).get("status") == "pending_upload":
            return event  # already counted
        try:
            self.state.check_cap(event, self.config.max_epsilon, self.config.delta)
        except LocalCapExceeded as error:
            raise TaskRefused(str(error)) from None
        return event

    def _check_round_cost(self, event: dict[str, Any]) -> None:
        from sitesagent.accountant import event_epsilon

        limit, delta = self.config.max_round_epsilon, self.config.delta
        if limit is not None and (cost := event_epsilon(event, delta)) > limit:
            raise TaskRefused(
                f"one round of it costs epsilon {cost:.6g} at delta {delta:g}, more than this site's "
                f"limit per round of {limit:g} (--max-round-epsilon)"
            )

    @staticmethod
    def _check_stated_cost(task: dict[str, Any], event: dict[str, Any]) -> None:
        from sitesagent.accountant import event_epsilon

        if task.get("dp_event") is None or task.get("epsilon") is None:
            raise TaskRefused(f"the coordinator states no cost for a round of {task['mechanism']!r}")
        if task["dp_event"] != event:
            raise TaskRefused(
                f"the coordinator states the DP event {task['dp_event']} but the round's parameters "
                f"make it {event}"
            )
        try:
            stated = protocol.positive_finite("the stated epsilon", task["epsilon"])
            delta = protocol.positive_finite("the stated delta", task.get("delta"), allow_zero=True)
            own = event_epsilon(event, delta)
        except protocol.ProtocolError as error:
            raise TaskRefused(str(error)) from None
        if not math.isclose(stated, own, rel_tol=1e-4, abs_tol=1e-9):
            raise TaskRefused(
                f"the coordinator states epsilon {stated:g} at delta {delta:g} for this round, but "
                f"its parameters cost {own:.6g}"
            )

    def _update_file(self, task_id: int) -> Path:
        return self.state.path.parent / ".sitesagent-updates" / f"task-{task_id}.safetensors"

    def _upload(self, task_id: int, update_file: Path) -> str:
        try:
            answer = self.client.upload(task_id, update_file.read_bytes())
        except CoordinatorError as error:
            log.error("the coordinator did not take the update for task %s: %s", task_id, error.message)
            if error.status in (409, 422):
                self.state.record_uploaded(task_id)  # it has it, or will never take it: do not resend
            return "rejected"
        self.state.record_uploaded(task_id)
        log.info("task %s: update uploaded (%s)", task_id, answer.get("status"))
        return "uploaded"

    # --- training -----------------------------------------------------------------------

    def _load_dataset(self):
        from sitesagent.data import check_dataset, discover_cases, split_cases

        cases = discover_cases(self.config.data)
        train_cases, val_cases = split_cases(cases, val_fraction=0.2, seed=self.config.seed)
        check = check_dataset(self.config.data)
        return {"train": train_cases, "val": val_cases, "check": check}

    def _describe(self) -> dict[str, Any]:
        from sitesagent.training import resolve_device

        device = resolve_device(self.config.device)
        check = self._dataset["check"]
        return {
            "device": str(device),
            "host": platform.node(),
            "cases": len(self._dataset["train"]) + len(self._dataset["val"]),
            "train_cases": len(self._dataset["train"]),
            "validation_cases": len(self._dataset["val"]),
            "data_check": check.to_dict(),
            "policy": self.config.policy(),
            "spent_epsilon": self.state.spent(self.config.delta),
        }

    def _train_and_protect(self, task: dict[str, Any]) -> bytes:
        import torch
        from safetensors.torch import load as load_safetensors

        from sitesagent.model import ModelConfig, build_model, state_to_flat
        from sitesagent.training import evaluate, train
        from sitesagent.updates import encode_update

        task_id = task["task"]
        base_state = load_safetensors(self.client.weights(task["base_version"], task["base_version_sha256"]))
        model = build_model(ModelConfig.from_dict(task["model_config"]), seed=0)
        model.load_state_dict(base_state)
        config = self._train_config(task)

        # A task resumed after a restart may be past evaluation already; states only move forward.
        if task["state"] in (protocol.TASK_ASSIGNED, protocol.TASK_EVALUATING):
            self.client.report(task_id, protocol.TASK_EVALUATING, progress=0.0)
            scores = evaluate(model, self._dataset["val"], config)
            for name in protocol.METRIC_DICE:
                if name in scores:
                    self.channel.send(task_id, name, task["round_number"], float(scores[name]))

        self.client.report(task_id, protocol.TASK_TRAINING, progress=0.0)
        dp = _dp_training(task)
        hooks = _StreamingHooks(self, task_id, stream_steps=dp is None)
        result = train(model, self._dataset["train"], config, hooks=hooks, dp=dp)
        hooks.close()

        base_flat = state_to_flat(base_state)
        delta = state_to_flat(model.state_dict()) - base_flat
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("training diverged: the trained weights are not finite numbers")
        indices, values = self._protect(task, delta / result.n_iterations)
        values = values * result.n_iterations
        return encode_update(
            indices=indices,
            values=values.to(torch.float32),
            n_parameters=base_flat.numel(),
            n_iterations=result.n_iterations,
            n_cases=result.n_cases,
            mechanism=task["mechanism"],
            params=task["mechanism_params"],
        )

    def _protect(self, task: dict[str, Any], per_step_delta):
        """Apply the round's mechanism to the per-step delta (DESIGN section 6): the release
        function its registry entry names, with fresh OS entropy when it draws noise."""
        import importlib

        import torch

        spec = protocol.mechanism_spec(task["mechanism"])
        module, name = spec.apply.split(":")
        release = getattr(importlib.import_module(module), name)
        params = {} if spec.during_training else dict(task["mechanism_params"])
        if "generator" in inspect.signature(release).parameters:
            generator = torch.Generator(device=per_step_delta.device)
            generator.seed()  # fresh OS entropy: privacy noise must never be reproducible by others
            params["generator"] = generator
        return release(per_step_delta, **params)

    def _train_config(self, task: dict[str, Any]):
        from sitesagent.training import TrainConfig

        params = task["training_params"]
        max_iterations = int(params.get("max_iterations") or 0)
        return TrainConfig(
            # With max_iterations set, the epoch count is ignored (but must still be valid).
            local_epochs=max(1, int(params.get("local_epochs") or 1)),
            max_iterations=max_iterations or None,
            batch_size=int(params.get("batch_size", 1)),
            lr=float(params.get("lr", 1e-4)),
            roi_size=(int(params.get("roi_size", 64)),) * 3,
            seed=self.config.seed + int(task["round_number"]),
            device=self.config.device,
        )


def _dp_training(task: dict[str, Any]):
    """DP-SGD's settings when the round's mechanism works while training, else None."""
    spec = protocol.mechanism_spec(task["mechanism"])
    if not spec.during_training:
        return None
    from sitesagent.dpsgd import DpSgdConfig

    return DpSgdConfig(**protocol.validate_mechanism(spec.name, task["mechanism_params"]))


class _StreamingHooks:
    """Training hooks: every step's loss goes to the live channel; progress goes over HTTP, throttled.

    Under DP-SGD (``stream_steps`` False) no step's loss or throughput leaves the site: both are
    computed from the sampled cases without noise, and they would reveal each step's batch size
    (an empty Poisson batch has no loss), which the accounting assumes hidden. Progress still goes.
    """

    def __init__(self, agent: Agent, task_id: int, *, stream_steps: bool = True, report_every: float = 2.0):
        self.agent = agent
        self.task_id = task_id
        self.stream_steps = stream_steps
        self.report_every = report_every
        self._last_report = 0.0
        self._bar: Any = None

    def on_phase(self, name: str) -> None:
        log.info("task %s: %s", self.task_id, name)

    def on_step(self, iteration: int, total: int, loss: float, samples_per_second: float) -> None:
        if self.stream_steps:
            channel = self.agent.channel
            channel.send(self.task_id, protocol.METRIC_TRAIN_LOSS, iteration, loss)
            channel.send(self.task_id, protocol.METRIC_THROUGHPUT, iteration, samples_per_second)
        self._progress_bar(iteration, total, loss)
        now = time.monotonic()
        if now - self._last_report >= self.report_every or iteration == total:
            self._last_report = now
            try:
                self.agent.client.report(
                    self.task_id,
                    protocol.TASK_TRAINING,
                    progress=min(1.0, iteration / max(total, 1)),
                    attempts=BEST_EFFORT_ATTEMPTS,  # training does not wait for a progress report
                )
            except (ConnectionError, CoordinatorError) as error:
                log.warning("could not report progress: %s", error)

    def _progress_bar(self, iteration: int, total: int, loss: float) -> None:
        if not self.agent.config.progress_bar:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"task {self.task_id}", unit="step")
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
