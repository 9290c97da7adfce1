"""Where a webhook may be posted: a job's own URL never reaches this host or a private network (unless
WEBHOOK_ALLOW_PRIVATE). A URL written with such an address is refused at create (`refuse_undeliverable`); a name is
resolved before each attempt, in threads of its own, once at a time per host (`lookup`), checked (`is_public`, not
one of this host's own addresses), and the POST goes to the address checked (`pinned`: the Host header and the TLS
name stay the URL's), so a DNS answer that changes in between (rebinding) cannot reach a private one (`aim`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import psutil

from application.exceptions import Invalid

_LOOKUPS = ThreadPoolExecutor(4, thread_name_prefix="webhook-dns")  # (threads start at the first lookup)

_LOOKING_UP: dict[str, Future[list[str]]] = {}  # host -> its lookup under way, shared by all who ask meanwhile
_LOOKING_UP_LOCK = threading.RLock()  # (a lookup already done runs its callback at once, in the caller's thread)


def lookup(host: str) -> Future[list[str]]:
    """`addresses(host)` in the lookup threads, once at a time per host: a user's many notifications to one
    black-holed name held all 4 threads, and every other user's own URLs timed out waiting for one."""
    with _LOOKING_UP_LOCK:
        found = _LOOKING_UP.get(host)
        if found is None:
            found = _LOOKING_UP[host] = _LOOKUPS.submit(addresses, host)
            found.add_done_callback(lambda done: _looked_up(host, done))
        return found


def _looked_up(host: str, done: Future[list[str]]) -> None:
    with _LOOKING_UP_LOCK:
        if _LOOKING_UP.get(host) is done:
            del _LOOKING_UP[host]


def addresses(host: str) -> list[str]:
    """The addresses `host` names or resolves to, in the resolver's order; none when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# IPv6 forms that carry an IPv4 address a gateway may deliver to (NAT64, IPv4-compatible, SIIT's IPv4-translated),
# and the deprecated site-local range: Python calls them global.
_CARRIERS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96",
                                                    "fec0::/10"))  # fmt: skip


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # (without an IPv6 zone: fe80::1%eth0)
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour  # the kernel (mapped) or a relay (6to4) reaches this IPv4 address
        if inner is not None:
            return is_public(str(inner))
        if any(ip in net for net in _CARRIERS):
            return False
    return True


_OWN: tuple[float, frozenset[str]] = (float("-inf"), frozenset())
OWN_ADDRESSES_EVERY = 60.0


def own_addresses() -> frozenset[str]:
    """The addresses on this host's interfaces (read again once a minute: an interface may come or go)."""
    global _OWN
    if time.monotonic() - _OWN[0] > OWN_ADDRESSES_EVERY:
        found = {_plain(a.address) for nics in psutil.net_if_addrs().values() for a in nics
                 if a.family in (socket.AF_INET, socket.AF_INET6)}  # fmt: skip
        _OWN = (time.monotonic(), frozenset(found))
    return _OWN[1]


def _plain(address: str) -> str:
    """One spelling per address: no IPv6 zone, and an IPv4-mapped IPv6 address as its IPv4 one (the kernel
    delivers ::ffff:a.b.c.d to a.b.c.d)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    inner = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(inner or ip)


def literal_address(host: str) -> str | None:
    """The address a host written as one names (127.0.0.1, and the forms the resolver also reads as addresses:
    127.1, 0x7f000001, 2130706433, [::ffff:127.0.0.1], and any of them with the root's trailing dot), normalised;
    None for a name. No lookup is made."""
    host = host.removesuffix(".") if not host.startswith("[") else host
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def refuse_undeliverable(url: str) -> None:
    """A job's webhook_url written with an address the deliveries would never post to is refused at create, not
    stored to fail at each notification (a name is resolved, and checked, at each delivery)."""
    host = httpx.URL(url).host
    address = literal_address(host)
    if address is not None and not is_public(address):
        raise Invalid(f"webhook_url points at {host} ({address}), an address of this host or of a private network: "
                      "notifications are never posted there (WEBHOOK_ALLOW_PRIVATE=true allows it)")  # fmt: skip


def pinned(url: str, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """`url` aimed at `address`, as (URL, extra headers, request extensions): the Host header and the TLS name
    (SNI and the certificate check) stay the URL's host, so only the lookup is skipped."""
    parsed = httpx.URL(url)
    return (
        parsed.copy_with(host=address),
        {"Host": parsed.netloc.decode("ascii")},
        {"sni_hostname": parsed.raw_host.decode("ascii")},
    )  # (the name's ASCII form, as the lookup used)


async def aim(url: str) -> tuple[str | httpx.URL, dict[str, str], dict[str, Any]] | None:
    """Where a job's own URL is posted: the address its name resolves to now, if public (None otherwise), used
    as it is. Letting the client resolve the name again would let a DNS answer that changed since the check
    (rebinding) reach a private address."""
    # The name as httpx sends it (IDNA 2008): resolving the text (IDNA 2003: straße.de as strasse.de) looked up
    # another domain than the Host header named.
    host = httpx.URL(url).raw_host.decode("ascii")
    # In threads of their own: a lookup a black-holed name server never answers holds its thread past the
    # attempt's timeout, and in the default pool a user's many such names stalled the scheduler's own reads.
    # (shielded: one caller given up cancels its own wait, not the lookup the others share)
    found = await asyncio.shield(asyncio.wrap_future(lookup(host)))
    # Nor this host's own public addresses: its services listening on every interface are not the user's.
    if not all(map(is_public, found)) or any(_plain(a) in own_addresses() for a in found):
        return None
    if not found:
        raise httpx.ConnectError(f"{host} does not resolve")
    return pinned(url, found[0])
