"""Origin country: the trusted header only from trusted proxies, then GeoIP (a MaxMind-format file
built here with mmdb-writer), then the tenant's billing country; the source is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

from metering.geo import InvalidCountry, OriginResolver


@pytest.fixture(scope="module")
def geoip_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("geoip") / "country.mmdb"
    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
    w.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB"}})
    w.insert_network(IPSet(["213.230.64.0/19"]), {"country": {"iso_code": "UZ"}})
    w.insert_network(IPSet(["2a02:2e0::/32"]), {"registered_country": {"iso_code": "DE"}})
    w.insert_network(IPSet(["95.56.0.0/16"]), {"country": {"iso_code": "kz"}})  # lower case in the file
    w.to_db_file(str(path))
    return path


def test_header_counts_only_from_a_trusted_proxy() -> None:
    r = OriginResolver("X-Client-Country", ["10.0.0.0/8", "127.0.0.1/32"])
    assert r.resolve({"x-client-country": "uz"}, "DE", "10.1.2.3") == ("UZ", "header")
    assert r.resolve({"x-client-country": "UZ"}, "DE", "127.0.0.1") == ("UZ", "header")
    # anyone else cannot choose their own country: ignored, not an error
    assert r.resolve({"x-client-country": "UZ"}, "DE", "203.0.113.7") == ("DE", "tenant")
    assert r.resolve({"x-client-country": "nonsense"}, "DE", "203.0.113.7") == ("DE", "tenant")
    assert r.resolve({"x-client-country": "UZ"}, "DE", None) == ("DE", "tenant")
    with pytest.raises(InvalidCountry):  # a trusted proxy sending garbage is a configuration error
        r.resolve({"x-client-country": "XX1"}, "DE", "10.1.2.3")


def test_geoip_decides_without_a_trusted_header(geoip_db: Path) -> None:
    r = OriginResolver("X-Client-Country", ["127.0.0.1/32"], geoip_db)
    assert r.resolve({}, "DE", "81.2.69.160") == ("GB", "geoip")
    assert r.resolve({}, "DE", "213.230.80.1") == ("UZ", "geoip")
    assert r.resolve({}, "US", "2a02:2e0:3fe:1001::1") == ("DE", "geoip")  # registered_country
    assert r.resolve({}, "DE", "95.56.1.1") == ("KZ", "geoip")
    assert r.resolve({}, "DE", "::ffff:81.2.69.1") == ("GB", "geoip")  # v4-mapped peer
    assert r.resolve({}, "DE", "198.51.100.9") == ("DE", "tenant")  # not in the database
    assert r.resolve({}, "DE", "192.168.1.10") == ("DE", "tenant")  # private
    # the untrusted client's header is ignored, GeoIP decides
    assert r.resolve({"x-client-country": "US"}, "DE", "81.2.69.5") == ("GB", "geoip")
    r.close()


def test_geoip_through_trusted_proxies_uses_the_first_untrusted_forwarded_address(geoip_db: Path) -> None:
    r = OriginResolver("X-Client-Country", ["127.0.0.1/32", "10.0.0.0/8"], geoip_db)
    # client -> proxy 10.0.0.5 -> proxy 10.0.0.6 -> us; a spoofed left-most entry is ignored
    xff = {"x-forwarded-for": "81.2.69.1, 213.230.64.9, 10.0.0.5"}
    assert r.resolve(xff, "DE", "10.0.0.6") == ("UZ", "geoip")
    # X-Forwarded-For from an untrusted peer is not believed: the peer itself is looked up
    assert r.resolve({"x-forwarded-for": "213.230.64.9"}, "DE", "81.2.69.7") == ("GB", "geoip")
    # the trusted header still wins over GeoIP
    assert r.resolve({**xff, "x-client-country": "KZ"}, "DE", "10.0.0.6") == ("KZ", "header")
    assert r.client_address({"x-forwarded-for": "garbage, 10.0.0.5"}, "10.0.0.6") is not None
    r.close()
