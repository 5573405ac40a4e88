"""The address syntax every caller of the API shares (the SDK, the CLI, and the services when they
call one another): how an address setting becomes a gRPC channel target.

An address is one of
* ``host:port`` (``[v6]:port`` for an IPv6 literal);
* a comma-separated list of them, one per replica (``10.0.0.5:50051,10.0.0.6:50051``): the channel
  spreads calls over every replica that is up (gRPC's ``round_robin``) and stops using one that
  goes down, so a dead replica costs only the calls in flight on it. Host names in a list are
  resolved when the channel is made; for replicas that come and go, give one DNS name instead;
* any gRPC target (``dns:///pipeline:50051``, whose name resolves to every replica, re-resolved
  by gRPC; ``ipv4:…``, ``unix:…``), taken as it is.

With TLS, a list's replicas present one certificate valid for the list's first host.

Pure Python (no gRPC), so both sides of the import contracts may use it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
# Every channel spreads calls over the addresses its target resolves to.
LOAD_BALANCING = ("grpc.lb_policy_name", "round_robin")


class AddressError(ValueError):
    """An address setting that names no reachable list of replicas."""


@dataclass(frozen=True)
class Target:
    """What gRPC is given for an address: `target`, plus the `authority` (the name TLS checks and
    calls carry) when the target is a list; `hosts` are the hosts it names, for loopback checks."""

    target: str
    hosts: tuple[str, ...]
    authority: str | None = None

    @property
    def options(self) -> list[tuple[str, str]]:
        return [LOAD_BALANCING] + ([("grpc.default_authority", self.authority)] if self.authority else [])

    @property
    def is_loopback(self) -> bool:
        return all(is_loopback_host(host) for host in self.hosts)


def parse(address: str) -> Target:
    address = address.strip()
    if address.startswith(SCHEMES):
        scheme, rest = address.split(":", 1)
        items = [item.strip() for item in rest.removeprefix("//").lstrip("/").split(",")]
        hosts = tuple(_host(item) for item in items) if scheme in ("dns", "ipv4", "ipv6") else ("localhost",)
        return Target(address, hosts)
    items = [item.strip() for item in address.split(",")]
    if not all(items):
        raise AddressError(f"address {address!r} has an empty entry: give host:port[,host:port...]")
    pairs = [_split(item) for item in items]
    if len(pairs) == 1:
        return Target(address, (pairs[0][0],))
    literals = [_literal(host, port) for host, port in pairs]
    families = {version for version, _ in literals}
    if families == {4} or families == {6}:
        scheme = "ipv4" if families == {4} else "ipv6"
        return Target(f"{scheme}:" + ",".join(text for _, text in literals), tuple(h for h, _ in pairs),
                      authority=items[0])
    return Target("ipv4:" + ",".join(_resolve(host, port) for host, port in pairs), tuple(h for h, _ in pairs),
                  authority=items[0])


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: not known to be this machine


def _split(item: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise AddressError(f"address {item!r} is not host:port")
    return host.strip("[]"), int(port)


def _host(item: str) -> str:
    host, sep, port = item.rpartition(":")
    return (host if sep and port.isdigit() else item).strip("[]")


def _literal(host: str, port: int) -> tuple[int, str]:
    """(4 or 6, the address as an ipv4:/ipv6: list entry), or (0, "") for a host name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return 0, ""
    return (4, f"{ip}:{port}") if ip.version == 4 else (6, f"[{ip}]:{port}")


def _resolve(host: str, port: int) -> str:
    """One IPv4 address of `host`, as an ipv4: list entry (a list mixing families is refused)."""
    try:
        found = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        raise AddressError(f"cannot resolve {host!r} (in an address list, names are resolved to IPv4 "
                           f"addresses when the channel is made): {exc}") from exc
    return f"{found[0][4][0]}:{port}"
