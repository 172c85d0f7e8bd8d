"""Immutable blobs (model versions, updates) on disk, addressed by their content hash.

A blob is written to a temporary file and renamed into place, so a crash never leaves a
half-written file under a real name, and writing the same bytes twice is harmless.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from django.conf import settings


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def root() -> Path:
    return Path(settings.STORAGE_DIR)


def relative_path(kind: str, digest: str) -> str:
    return f"{kind}/{digest[:2]}/{digest}.safetensors"


def put(kind: str, data: bytes) -> tuple[str, str]:
    """Store ``data`` under ``kind`` (``versions`` or ``updates``); return (relative path, sha256)."""
    digest = sha256_of(data)
    relative = relative_path(kind, digest)
    target = root() / relative
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return relative, digest


def discard(relative: str) -> None:
    """Remove a blob that no row refers to (its transaction failed)."""
    path_of(relative).unlink(missing_ok=True)


def path_of(relative: str) -> Path:
    return root() / relative


def get(relative: str, expected_sha256: str | None = None) -> bytes:
    data = path_of(relative).read_bytes()
    if expected_sha256 is not None and sha256_of(data) != expected_sha256:
        raise OSError(f"stored blob {relative} does not match its recorded hash; it was altered on disk")
    return data
