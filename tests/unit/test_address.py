"""A node finds its address in the reference order: host name, listen address, hostname lookup, interfaces.

Every lookup is injected, so each strategy is chosen here on purpose, whatever this machine's
names and interfaces are. No I/O.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

import pytest

from muster.client import AddressNotFoundError, ResolvedAddress, resolve_node_address


def _never(what: str) -> Callable[..., Sequence[str]]:
    def called(*_: object) -> Sequence[str]:
        raise AssertionError(f"{what} was consulted although an earlier strategy applies")

    return called


def _lookup(table: dict[str, list[str]]) -> Callable[[str], Sequence[str]]:
    def lookup(name: str) -> Sequence[str]:
        if name not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[name]

    return lookup


def test_the_configured_host_name_comes_first() -> None:
    got = resolve_node_address(
        port=8787,
        host_name="app1.example.com",
        listen_address="10.0.0.9",
        gethostname=_never("gethostname"),
        lookup=_lookup({"app1.example.com": ["127.0.0.1", "::1", "10.1.1.1"]}),
        interfaces=_never("interfaces"),
    )
    assert got == ResolvedAddress("app1.example.com", 8787, "10.1.1.1", "host-name")
    assert got.address == "app1.example.com:8787"


def test_a_host_name_that_does_not_resolve_is_still_used_without_an_ipv4() -> None:
    got = resolve_node_address(
        port=1, host_name="not-in-dns.example", lookup=_lookup({}), interfaces=_never("interfaces")
    )
    assert (got.host, got.ipv4, got.strategy) == ("not-in-dns.example", "", "host-name")


def test_the_listen_address_comes_second() -> None:
    got = resolve_node_address(
        port=9000,
        listen_address="10.2.3.4",
        gethostname=_never("gethostname"),
        lookup=_never("lookup"),
        interfaces=_never("interfaces"),
    )
    assert got == ResolvedAddress("10.2.3.4", 9000, "10.2.3.4", "listen-address")


def test_an_ipv6_listen_address_is_written_in_brackets() -> None:
    got = resolve_node_address(port=8787, listen_address="[2001:db8::7]", interfaces=_never("interfaces"))
    assert (got.host, got.ipv4, got.strategy) == ("2001:db8::7", "", "listen-address")
    assert got.address == "[2001:db8::7]:8787"


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", "", "*"])
def test_a_wildcard_listen_address_is_skipped_for_the_hostname_lookup(wildcard: str) -> None:
    got = resolve_node_address(
        port=8787,
        listen_address=wildcard,
        gethostname=lambda: "box",
        lookup=_lookup({"box": ["10.0.0.7"]}),
        interfaces=_never("interfaces"),
    )
    assert (got.host, got.strategy) == ("10.0.0.7", "hostname-lookup")


def test_the_hostname_lookup_takes_the_first_non_loopback_non_multicast_address() -> None:
    got = resolve_node_address(
        port=8787,
        gethostname=lambda: "box",
        lookup=_lookup({"box": ["127.0.1.1", "::1", "224.0.0.5", "ff02::1", "fe80::1", "10.0.0.7", "10.0.0.8"]}),
        interfaces=_never("interfaces"),
    )
    assert got == ResolvedAddress("10.0.0.7", 8787, "10.0.0.7", "hostname-lookup")


def test_an_ipv6_only_hostname_lookup_gives_an_ipv6_address_without_an_ipv4() -> None:
    got = resolve_node_address(
        port=8787, gethostname=lambda: "v6box", lookup=_lookup({"v6box": ["::1", "2001:db8::5"]})
    )
    assert (got.host, got.ipv4, got.strategy) == ("2001:db8::5", "", "hostname-lookup")
    assert got.address == "[2001:db8::5]:8787"


def test_a_loopback_only_hostname_falls_through_to_the_last_non_loopback_interface() -> None:
    # Debian maps the host name to 127.0.1.1: the lookup finds nothing usable.
    got = resolve_node_address(
        port=8787,
        gethostname=lambda: "debian",
        lookup=_lookup({"debian": ["127.0.1.1", "::1"]}),
        interfaces=lambda: ["127.0.0.1", "10.0.0.5", "169.254.9.9", "192.168.1.9", "127.0.0.2"],
    )
    assert got == ResolvedAddress("192.168.1.9", 8787, "192.168.1.9", "interfaces")


def test_a_host_name_that_does_not_resolve_falls_through_to_the_interfaces() -> None:
    got = resolve_node_address(
        port=8787, gethostname=lambda: "unknown", lookup=_lookup({}), interfaces=lambda: ["10.9.9.9"]
    )
    assert (got.host, got.strategy) == ("10.9.9.9", "interfaces")


def test_nothing_usable_raises_address_not_found_naming_the_host_name_and_the_fix() -> None:
    with pytest.raises(AddressNotFoundError) as info:
        resolve_node_address(
            port=8787,
            listen_address="0.0.0.0",
            gethostname=lambda: "lonely",
            lookup=_lookup({"lonely": ["127.0.1.1"]}),
            interfaces=lambda: ["127.0.0.1"],
        )
    message = str(info.value)
    assert "'lonely'" in message and "loopback" in message
    assert "--host-name" in message and "MUSTER_HOST_NAME" in message
