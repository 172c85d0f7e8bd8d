"""The agent's own memory, in one JSON file: what it released (its DP events) and what it uploaded.

The site's local epsilon cap is enforced against this file, not against anything the
coordinator says, so a coordinator can never talk a site past its own limit. A release is written
down *before* an update leaves the machine, and the encoded update is kept until the upload
is acknowledged: after a crash the agent re-sends the same bytes (the coordinator recognises
them and commits nothing twice) instead of training again and sending a second update.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sitesagent import accountant


class LocalCapExceeded(Exception):
    """A task would take this site past its own epsilon limit."""


@dataclass
class AgentState:
    """What this site has released (one DP event per update sent) and where each task stands.

    Spend is never a number taken from anyone: it is the accountant's epsilon over ``releases``
    (sitesagent.accountant), the same figure the coordinator's ledger composes.
    """

    path: Path
    releases: list[dict[str, Any]] = field(default_factory=list)  # {"task": id, "event": {...} | None}
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> AgentState:
        if not path.exists():
            return cls(path=path)
        try:
            raw = json.loads(path.read_text())
            state = cls(path=path, releases=list(raw.get("releases", [])), tasks=dict(raw["tasks"]))
            if "spent_epsilon" in raw and float(raw["spent_epsilon"]) > 0:
                # A state file from before events were kept: its total, as one pure release, is an
                # upper bound on what the releases it summed compose to.
                state.releases.insert(
                    0, {"task": None, "event": {"kind": "pure", "epsilon": float(raw["spent_epsilon"])}}
                )
            state.events()  # every recorded event must be one the accountant can read
            return state
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(
                f"the agent's state file {path} is unreadable ({error}); it records the epsilon this site "
                "has spent, so the agent will not guess: restore it from a backup or remove it knowingly"
            ) from error

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as handle:
            json.dump({"releases": self.releases, "tasks": self.tasks}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def task(self, task_id: int) -> dict[str, Any]:
        return self.tasks.get(str(task_id), {})

    def has_released(self, task_id: int) -> bool:
        """Whether an update for this task has left (or may have left) the site."""
        return self.task(task_id).get("status") in ("pending_upload", "uploaded")

    def events(self) -> list[accountant.DpEvent]:
        return accountant.events_from(r["event"] for r in self.releases if r.get("event") is not None)

    def spent(self, delta: float) -> float:
        """The accountant's epsilon at ``delta`` over everything this site released."""
        return accountant.composed_epsilon(self.events(), delta)

    def pending_uploads(self) -> list[tuple[int, Path]]:
        """Updates whose spend is counted but whose upload was never acknowledged."""
        return [
            (int(task_id), Path(entry["update_file"]))
            for task_id, entry in self.tasks.items()
            if entry.get("status") == "pending_upload" and Path(entry.get("update_file", "")).is_file()
        ]

    def check_cap(
        self, event: dict[str, Any] | None, max_epsilon: float | None, delta: float
    ) -> float | None:
        """The epsilon at ``delta`` after releasing ``event``; LocalCapExceeded past ``max_epsilon``."""
        if event is None:
            return None
        after = accountant.composed_epsilon([*self.events(), accountant.DpEvent.from_dict(event)], delta)
        if max_epsilon is not None and after > max_epsilon * (1 + 1e-12):
            raise LocalCapExceeded(
                f"this task would take the site to epsilon {after:.6g} at delta {delta:g} (it has spent "
                f"{self.spent(delta):.6g}), past its local limit of {max_epsilon:g} (--max-epsilon)"
            )
        return after

    def record_pending_upload(self, task_id: int, *, event: dict[str, Any] | None, update_file: Path) -> None:
        """Count the release and remember the update, before a single byte of it is sent."""
        entry = self.tasks.setdefault(str(task_id), {})
        if entry.get("status") in ("pending_upload", "uploaded"):
            return
        self.releases.append({"task": task_id, "event": event})
        entry.update(status="pending_upload", event=event, update_file=str(update_file))
        self.save()

    def record_uploaded(self, task_id: int) -> None:
        entry = self.tasks.setdefault(str(task_id), {})
        update_file = entry.pop("update_file", None)
        entry["status"] = "uploaded"
        self.save()
        if update_file:
            Path(update_file).unlink(missing_ok=True)

    def record_refused(self, task_id: int, reason: str) -> None:
        self.tasks[str(task_id)] = {"status": "refused", "reason": reason}
        self.save()

    def record_failed(self, task_id: int, reason: str) -> None:
        self.tasks[str(task_id)] = {"status": "failed", "reason": reason}
        self.save()
