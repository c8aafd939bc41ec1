"""A lease: a small file saying that a live run holds something (an output's attempt folder, its
commit), so that a second run waits instead of writing beside it, and takes over only when the
holder is gone.

The file is created only if absent (``storage.create_bytes``: an exclusive create locally,
``If-None-Match: *`` on S3) and records the holder's host, pid, a token and a heartbeat that a
thread renews every :data:`HEARTBEAT_S` while held. A holder is gone when its process has ended
(same host) or its heartbeat is older than :data:`STALE_S` (a run on another machine that died).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from infra import storage

log = logging.getLogger(__name__)

STALE_S = 120.0  # a lease whose heartbeat is older than this was left by a run that died
HEARTBEAT_S = 30.0  # how often the run holding one renews it


class Lease:
    """A small file saying that a live run holds something (an attempt, a commit): created only if
    absent, renewed by a heartbeat thread while held, and taken over once its holder is gone: its
    process has ended (same host), or its heartbeat is older than :data:`STALE_S` (a run
    on another machine that died). ``fields`` are recorded with it; a holder whose ``match`` fields
    differ is never taken over (another identity's claim is a conflict, not a leftover)."""

    def __init__(self, uri: str, match: Sequence[str] = (), **fields: Any):
        self.uri, self.match = uri, tuple(match)
        self.fields = {**fields, "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
        self.token = uuid.uuid4().hex[:12]
        self.taken_from: dict[str, Any] | None = None  # the record of a gone holder this run took over
        self._stop: threading.Event | None = None

    @property
    def held(self) -> bool:
        return self._stop is not None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stop": None}  # a copy sent to a worker holds nothing

    def _blob(self, heartbeat: float | None = None) -> bytes:
        return storage.to_json_bytes(
            {
                **self.fields,
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat": time.time() if heartbeat is None else heartbeat,
            }
        )

    def holder(self) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.uri)
        except FileNotFoundError:
            return None

    @staticmethod
    def gone(record: dict[str, Any]) -> bool:
        """Whether the run that wrote ``record`` no longer holds it."""
        if record.get("host") == socket.gethostname() and record.get("pid") != os.getpid():
            try:
                os.kill(int(record["pid"]), 0)
            except ProcessLookupError:
                return True
            except (OSError, KeyError, TypeError, ValueError):
                pass
        return time.time() - float(record.get("heartbeat", 0)) > STALE_S

    def try_acquire(self) -> dict[str, Any] | None:
        """Hold the lease if it is free or its holder is gone: None. Else the live holder's record."""
        while True:
            if storage.create_bytes(self.uri, self._blob()):
                break
            held = self.holder()
            if held is None:  # released meanwhile
                continue
            if not self.gone(held) or any(held.get(k) != self.fields.get(k) for k in self.match):
                return held
            storage.write_bytes(self.uri, self._blob())  # take over; of two takers the last write wins
            time.sleep(1.0)
            if (self.holder() or {}).get("token") != self.token:
                continue
            self.taken_from = held
            break
        self._stop = threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), daemon=True, name="lease").start()
        return None

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the work goes on
                log.warning("could not renew %s: %s", storage.redact(self.uri), e)

    def renew(self, **fields: Any) -> None:
        """Rewrite the record (fresh heartbeat, ``fields`` updated) while held."""
        self.fields.update(fields)
        if self.held:
            storage.write_bytes(self.uri, self._blob())

    def release(self, *, remove: bool = True) -> None:
        """Stop holding: the file goes (``remove``) or stays marked as left, so that the next run of
        the same ``match`` takes it over at once (a commit that failed half-way is finished by it)."""
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        if (self.holder() or {}).get("token") != self.token:
            return
        if remove:
            storage.remove(self.uri)
        else:
            storage.write_bytes(self.uri, self._blob(heartbeat=0.0))
