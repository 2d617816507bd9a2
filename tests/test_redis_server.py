"""The Redis the movers' tests use: started once, and a crash followed by a start that keeps its port and
loses what it held (the fault the movers must survive)."""

from __future__ import annotations

import time

import redis as redis_client


def test_killed_and_started_again_on_the_same_port_with_nothing_kept(redis):
    client = redis_client.Redis(host="127.0.0.1", port=redis.port)
    client.set(b"volcopy-test-survives", b"1")
    redis.kill()
    assert not redis.ping()
    started = time.monotonic()
    redis.start()
    seconds = time.monotonic() - started

    assert client.get(b"volcopy-test-survives") is None  # the client reconnects; the key died with it
    assert seconds < 2.0, f"Redis took {seconds:.2f} s to start"
