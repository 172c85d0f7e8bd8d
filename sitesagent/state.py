"""The agent's own memory, in one JSON file next to its data: what it spent and what it uploaded.

The site's local epsilon cap is enforced against this file, not against anything the
coordinator says, so a coordinator can never talk a site past its own limit. Spend is written
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


class LocalCapExceeded(Exception):
    """A task would take this site past its own epsilon limit."""


@dataclass
class AgentState:
    path: Path
    spent_epsilon: float = 0.0
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> AgentState:
        if not path.exists():
            return cls(path=path)
        try:
            raw = json.loads(path.read_text())
            return cls(path=path, spent_epsilon=float(raw["spent_epsilon"]), tasks=dict(raw["tasks"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(
                f"the agent's state file {path} is unreadable ({error}); it records the epsilon this site "
                "has spent, so the agent will not guess: restore it from a backup or remove it knowingly"
            ) from error

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as handle:
            json.dump({"spent_epsilon": self.spent_epsilon, "tasks": self.tasks}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def task(self, task_id: int) -> dict[str, Any]:
        return self.tasks.get(str(task_id), {})

    def pending_uploads(self) -> list[tuple[int, Path]]:
        """Updates whose spend is counted but whose upload was never acknowledged."""
        return [
            (int(task_id), Path(entry["update_file"]))
            for task_id, entry in self.tasks.items()
            if entry.get("status") == "pending_upload" and Path(entry.get("update_file", "")).is_file()
        ]

    def check_cap(self, epsilon: float | None, max_epsilon: float | None) -> None:
        if epsilon is None or max_epsilon is None:
            return
        if self.spent_epsilon + epsilon > max_epsilon + 1e-12:
            raise LocalCapExceeded(
                f"this task costs {epsilon:g} epsilon and the site has spent {self.spent_epsilon:g} "
                f"of its local limit of {max_epsilon:g} (--max-epsilon)"
            )

    def record_pending_upload(self, task_id: int, *, epsilon: float | None, update_file: Path) -> None:
        """Count the spend and remember the update, before a single byte of it is sent."""
        entry = self.tasks.setdefault(str(task_id), {})
        if entry.get("status") in ("pending_upload", "uploaded"):
            return
        if epsilon is not None:
            self.spent_epsilon += epsilon
        entry.update(status="pending_upload", epsilon=epsilon, update_file=str(update_file))
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
