"""Test hosts made of network namespaces: each host is a namespace (``ip netns add``) joined to this host
by a veth pair on a /30 of its own (this host's end ``gateway``, the namespace's end ``address``), and
its processes run with a host name of their own (a UTS namespace). A server of this host that listens
on ``gateway`` is reached from that host, and nothing else is: the namespace has no other route.

``link_down()`` takes the namespace's end of the link down (the host is cut off; its sockets find
the network unreachable) and ``link_up()`` brings it back, with its address and route.

The /30 is drawn at random in 10.64.0.0/10 and checked against every address in use here, so that
test sessions running side by side do not collide. The ``netns_hosts`` fixture removes every host it
made (the veth pair goes with its namespace).
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
import uuid

import pytest

IP = shutil.which("ip")

needs_netns = pytest.mark.skipif(
    IP is None or shutil.which("unshare") is None or os.geteuid() != 0,
    reason="hosts in network namespaces need root, ip (iproute2) and unshare (util-linux)",
)


def _ip(*args: str, namespace: str | None = None) -> str:
    command = [IP, "netns", "exec", namespace, IP, *args] if namespace else [IP, *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def _free_subnet() -> ipaddress.IPv4Network:
    in_use = _ip("-o", "-4", "addr", "show") + _ip("-4", "route", "show")
    pool = ipaddress.IPv4Network("10.64.0.0/10")
    for _ in range(100):
        start = int(pool.network_address) + 4 * random.randrange(pool.num_addresses // 4)
        subnet = ipaddress.IPv4Network((start, 30))
        if not any(str(address) in in_use for address in subnet):  # a prefix of another counts too
            return subnet
    raise RuntimeError("no free /30 in 10.64.0.0/10")


class NetnsHost:
    def __init__(self, hostname: str):
        self.hostname = hostname
        tag = uuid.uuid4().hex[:8]
        self.namespace = f"volcopy-{tag}"
        self.outer = f"vc{tag}h"  # this host's end (interface names are at most 15 characters)
        self.inner = f"vc{tag}n"
        subnet = _free_subnet()
        self.gateway, self.address = (str(a) for a in list(subnet.hosts())[:2])
        _ip("netns", "add", self.namespace)
        try:
            _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
            _ip("link", "set", self.inner, "netns", self.namespace)
            _ip("addr", "add", f"{self.gateway}/30", "dev", self.outer)
            _ip("link", "set", self.outer, "up")
            _ip("addr", "add", f"{self.address}/30", "dev", self.inner, namespace=self.namespace)
            _ip("link", "set", "lo", "up", namespace=self.namespace)
            _ip("link", "set", self.inner, "up", namespace=self.namespace)
        except BaseException:
            self.remove()
            raise

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run on this host: in its namespace, with its host name."""
        script = f'hostname {self.hostname} && exec "$@"'
        return [
            IP,
            "netns",
            "exec",
            self.namespace,
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            *argv,
        ]

    def link_down(self) -> None:
        _ip("link", "set", self.inner, "down", namespace=self.namespace)

    def link_up(self) -> None:
        _ip("link", "set", self.inner, "up", namespace=self.namespace)

    def remove(self) -> None:
        subprocess.run([IP, "link", "del", self.outer], capture_output=True)
        subprocess.run([IP, "netns", "del", self.namespace], capture_output=True)


@pytest.fixture
def netns_hosts():
    """``netns_hosts(hostname)`` makes a host; all are removed after the test (their processes first:
    stop them before this fixture's teardown, e.g. with a fixture that depends on this one)."""
    made: list[NetnsHost] = []

    def make(hostname: str) -> NetnsHost:
        host = NetnsHost(hostname)
        made.append(host)
        return host

    yield make
    for host in made:
        host.remove()
