"""How a node finds its own address, in the reference order.

1. the configured host name (``--host-name``);
2. the configured listen address (``--listen-address``), unless it is a wildcard;
3. the first non-loopback, non-multicast address of this machine's resolved host name;
4. the last non-loopback IPv4 address of the network interfaces.

Every lookup is injectable, so each strategy can be tested on a machine whose host name maps to
127.0.1.1 (Debian) and that may have no other interface.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from muster.client.errors import AddressNotFoundError

_WILDCARDS = {"", "0.0.0.0", "::", "*"}
_SIOCGIFADDR = 0x8915


@dataclass(frozen=True)
class ResolvedAddress:
    """Where the node is reached, and which strategy found it."""

    host: str
    port: int
    ipv4: str
    strategy: str  # "host-name", "listen-address", "hostname-lookup", "interfaces"

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def interface_ipv4_addresses() -> list[str]:
    """The IPv4 address of every interface, in interface order (Linux ioctl; empty elsewhere)."""
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            out.append(socket.inet_ntoa(raw[20:24]))
    return out


def _usable(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    return not (addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_link_local)


def _first_ipv4(candidates: Sequence[str]) -> str:
    for ip in candidates:
        try:
            if isinstance(ipaddress.ip_address(ip), ipaddress.IPv4Address) and _usable(ip):
                return ip
        except ValueError:
            continue
    return ""


def resolve_node_address(
    *,
    port: int,
    host_name: str | None = None,
    listen_address: str | None = None,
    gethostname: Callable[[], str] = socket.gethostname,
    lookup: Callable[[str], Sequence[str]] | None = None,
    interfaces: Callable[[], Sequence[str]] = interface_ipv4_addresses,
) -> ResolvedAddress:
    """Finds this node's address in the reference order.

    Raises:
        AddressNotFoundError: nothing usable; set ``--host-name``.
    """
    lookup = lookup or _lookup
    if host_name:
        return ResolvedAddress(host_name, port, _first_ipv4(_safe(lookup, host_name)), "host-name")
    if listen_address and listen_address not in _WILDCARDS:
        return ResolvedAddress(listen_address.strip("[]"), port, _first_ipv4([listen_address]), "listen-address")
    name = gethostname()
    found = [ip for ip in _safe(lookup, name) if _usable(ip)]
    if found:
        return ResolvedAddress(found[0], port, _first_ipv4(found), "hostname-lookup")
    v4 = [ip for ip in interfaces() if _usable(ip)]
    if v4:
        return ResolvedAddress(v4[-1], port, v4[-1], "interfaces")
    raise AddressNotFoundError(
        f"cannot find this node's address: {name!r} resolves only to loopback addresses and no interface "
        "has a usable IPv4 address; set --host-name (MUSTER_HOST_NAME)"
    )


def _lookup(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _safe(lookup: Callable[[str], Sequence[str]], name: str) -> list[str]:
    try:
        return list(lookup(name))
    except OSError:
        return []
