"""Origin-country attribution: where a request came from (on the usage event, with its source).

The first source that knows decides, and the event records which one (``origin_source``):

1. ``header``: the trusted origin-country header (``gateway.origin_country_header``), accepted only
   when the TCP peer is one of the configured proxies (``gateway.trusted_proxies``, CIDRs). A
   malformed value from a trusted proxy is an error (400), never ignored; the header from anyone
   else is ignored, so a client cannot choose its own country.
2. ``geoip``: the client's address looked up in a MaxMind-format database (``gateway.geoip_db``,
   GeoLite2/GeoIP2 Country or City, read with ``maxminddb``). The client's address is the peer, or,
   when the peer is a trusted proxy, the right-most address in ``X-Forwarded-For`` that is not a
   trusted proxy itself. Private, loopback and unknown addresses give no answer.
3. ``tenant``: the tenant's billing country.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from metering.tenants import valid_country

log = logging.getLogger("tokenport.geo")
DEFAULT_TRUSTED_PROXIES = ("127.0.0.1/32", "::1/128")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidCountry(ValueError):
    pass


def _address(value: str | None) -> IPAddress | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class GeoIP:
    """Country lookups in a MaxMind-format (.mmdb) database file."""

    def __init__(self, path: Path) -> None:
        import maxminddb

        self.path = path
        self._reader = maxminddb.open_database(str(path))

    def country(self, addr: IPAddress) -> str | None:
        if not addr.is_global:
            return None
        try:
            record: Any = self._reader.get(str(addr))
        except (ValueError, OSError):
            return None
        if not isinstance(record, dict):
            return None
        for key in ("country", "registered_country"):
            part = record.get(key)
            if isinstance(part, dict):
                code = part.get("iso_code")
                if isinstance(code, str) and valid_country(code.upper()):
                    return code.upper()
        return None

    def close(self) -> None:
        self._reader.close()


class OriginResolver:
    """Decides a request's origin country: trusted header, then GeoIP, then the tenant's country."""

    def __init__(
        self,
        header: str,
        trusted_proxies: Iterable[str] = DEFAULT_TRUSTED_PROXIES,
        geoip_db: Path | None = None,
    ) -> None:
        self.header = header.lower()
        self.trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in trusted_proxies
        )
        self.geoip = GeoIP(geoip_db) if geoip_db is not None else None

    def is_trusted(self, addr: IPAddress | None) -> bool:
        return addr is not None and any(addr in net for net in self.trusted)

    def client_address(self, headers: Mapping[str, str], peer: str | None) -> IPAddress | None:
        """The peer, or through trusted proxies the right-most untrusted X-Forwarded-For address."""
        addr = _address(peer)
        if not self.is_trusted(addr):
            return addr
        forwarded = headers.get("x-forwarded-for")
        if not forwarded:
            return addr
        for hop in reversed([h for h in forwarded.split(",") if h.strip()]):
            hop_addr = _address(hop)
            if hop_addr is None:
                return addr  # garbage in the chain: do not look further than what we can trust
            if not self.is_trusted(hop_addr):
                return hop_addr
            addr = hop_addr
        return addr

    def resolve(
        self, headers: Mapping[str, str], billing_country: str, peer: str | None = None
    ) -> tuple[str, str]:
        """(origin country, source): source is `header`, `geoip` or `tenant`."""
        raw = headers.get(self.header)
        if raw is not None and self.is_trusted(_address(peer)):
            code = raw.strip().upper()
            if len(code) != 2 or not valid_country(code):
                raise InvalidCountry(
                    f"{self.header} must be an ISO 3166-1 alpha-2 country code, got {raw[:16]!r}"
                )
            return code, "header"
        if self.geoip is not None:
            addr = self.client_address(headers, peer)
            if addr is not None:
                found = self.geoip.country(addr)
                if found is not None:
                    return found, "geoip"
        return billing_country, "tenant"

    def close(self) -> None:
        if self.geoip is not None:
            self.geoip.close()
