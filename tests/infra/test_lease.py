"""The lease that holds an attempt folder or a commit (infra/lease.py), on local files."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from infra import lease, storage
from infra.lease import Lease


def test_a_lease_is_taken_over_only_when_its_holder_is_gone(tmp_path):
    """A live holder's lease is refused to others; a holder whose process ended is replaced at once
    (same host), and the record it left is handed over."""
    uri = str(tmp_path / "lease.json")
    first = Lease(uri, stage="demo", registered={"version": 3})
    assert first.try_acquire() is None and first.held
    assert Lease(uri, stage="demo").try_acquire()["token"] == first.token  # alive: refused
    first.release()
    assert not storage.exists(uri)  # released: the file is gone
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    left = {"stage": "demo", "token": "x", "host": socket.gethostname(), "pid": int(dead.stdout)}
    storage.write_json(uri, {**left, "heartbeat": time.time(), "registered": {"version": 3}})
    taker = Lease(uri, ("stage",), stage="demo")
    assert taker.try_acquire() is None and taker.taken_from["registered"] == {"version": 3}
    assert storage.read_json(uri)["token"] == taker.token
    taker.release(remove=False)  # left after a failure: the next run takes it over at once
    assert Lease.gone(storage.read_json(uri))
    other = Lease(uri, ("stage",), stage="another")
    assert other.try_acquire()["stage"] == "demo"  # a gone holder of another stage: not taken over


def test_a_held_lease_beats_and_a_stopped_one_goes_stale(tmp_path, monkeypatch):
    """While held, the heartbeat advances; once the holder stops beating, the record goes stale."""
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(lease, "STALE_S", 1.0)
    uri = str(tmp_path / "lease.json")
    held = Lease(uri, stage="demo")
    assert held.try_acquire() is None
    first = storage.read_json(uri)["heartbeat"]
    time.sleep(0.7)
    assert storage.read_json(uri)["heartbeat"] > first and not Lease.gone(storage.read_json(uri))
    held._stop.set()  # the process froze: no more beats
    time.sleep(1.3)
    assert Lease.gone(storage.read_json(uri))
