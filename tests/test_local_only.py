"""Which forwarded clients are this host's (api/local_only.py)."""

from __future__ import annotations

import pytest

from application.api.local_only import forwarded_clients, is_loopback


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]:8080", True), ("127.0.0.1:5000", True),
    ('"[::1]"', True), ("::ffff:127.0.0.1", True),
    ("192.0.2.2", False), ("[2001:db8::1]:4711", False), ("unknown", False), ("_hidden", False), ("", False),
])  # fmt: skip
def test_loopback_addresses_as_forwarding_headers_write_them(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_every_forwarding_header_entry_is_read() -> None:
    headers = [(b"x-forwarded-for", b"127.0.0.1, 192.0.2.2"), (b"host", b"x"), (b"x-real-ip", b"10.0.0.1"),
               (b"forwarded", b'for=198.51.100.7;proto=https, For="[2001:db8::1]"')]  # fmt: skip
    assert list(forwarded_clients(headers)) == ["127.0.0.1", "192.0.2.2", "10.0.0.1", "198.51.100.7",
                                                '"[2001:db8::1]"']  # fmt: skip
