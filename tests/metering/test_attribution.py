"""Origin country (OriginResolver) and language (LanguageDetector, prompt_sample)."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.datastructures import Headers

from metering.geo import InvalidCountry, OriginResolver
from metering.language import SAMPLE_CHARS, UNDETERMINED, LanguageDetector, prompt_sample


@pytest.fixture(scope="module")
def detector() -> LanguageDetector:
    return LanguageDetector()


PROXY = "127.0.0.1"  # a trusted proxy by default
CLIENT = "203.0.113.7"  # anyone else


@pytest.fixture(scope="module")
def geoip_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MaxMind-format database: 81.2.69.0/24 GB, 2a02:ec0::/29 DE, 1.128.0.0/11 AU (registered)."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    w = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country")
    w.insert_network(IPSet(["81.2.69.0/24"]), {"country": {"iso_code": "GB"}})
    w.insert_network(IPSet(["2a02:ec0::/29"]), {"country": {"iso_code": "de"}})
    w.insert_network(IPSet(["1.128.0.0/11"]), {"registered_country": {"iso_code": "AU"}})
    w.insert_network(IPSet(["5.5.5.0/24"]), {"country": {"iso_code": "XX"}})
    path = tmp_path_factory.mktemp("geo") / "country.mmdb"
    w.to_db_file(str(path))
    return path


@pytest.mark.parametrize(
    ("raw", "want"), [("DE", "DE"), ("de", "DE"), (" fr ", "FR"), ("sA", "SA"), ("gb", "GB")]
)
def test_header_from_a_trusted_proxy_wins_and_is_normalised(raw: str, want: str) -> None:
    r = OriginResolver("X-Client-Country")
    assert r.resolve(Headers({"x-client-country": raw}), "JP", PROXY) == (want, "header")
    assert r.resolve(Headers({"X-CLIENT-COUNTRY": raw}), "JP", "[::1]:5555") == (want, "header")


@pytest.mark.parametrize("peer", [CLIENT, None, "not-an-address", "10.1.2.3"])
def test_header_from_anyone_else_is_ignored(peer: str | None) -> None:
    r = OriginResolver("X-Client-Country")
    assert r.resolve(Headers({"x-client-country": "US"}), "JP", peer) == ("JP", "tenant")
    # not even validated: a client cannot cause errors with a header it may not set
    assert r.resolve(Headers({"x-client-country": "garbage"}), "JP", peer) == ("JP", "tenant")


def test_configured_proxies_replace_the_default() -> None:
    r = OriginResolver("X-Client-Country", trusted_proxies=["10.0.0.0/8"])
    assert r.resolve(Headers({"x-client-country": "US"}), "JP", "10.9.8.7:443") == ("US", "header")
    assert r.resolve(Headers({"x-client-country": "US"}), "JP", PROXY) == ("JP", "tenant")


def test_custom_header_name() -> None:
    r = OriginResolver("CF-IPCountry")
    assert r.header == "cf-ipcountry"
    assert r.resolve(Headers({"cf-ipcountry": "ke"}), "JP", PROXY) == ("KE", "header")
    assert r.resolve(Headers({"x-client-country": "ke"}), "JP", PROXY) == ("JP", "tenant")


def test_no_header_falls_back_to_the_tenant() -> None:
    assert OriginResolver("X-Client-Country").resolve(Headers({}), "TR", PROXY) == ("TR", "tenant")


@pytest.mark.parametrize("raw", ["", "X", "USA", "XX", "UK", "12", "D E", "ÄÖ", "EU"])
def test_malformed_header_from_a_trusted_proxy_is_an_error_not_ignored(raw: str) -> None:
    with pytest.raises(InvalidCountry, match="ISO 3166-1 alpha-2"):
        OriginResolver("X-Client-Country").resolve({"x-client-country": raw}, "DE", PROXY)


@pytest.mark.parametrize(
    ("peer", "forwarded", "want"),
    [
        ("81.2.69.142", None, ("GB", "geoip")),  # the peer itself
        ("[2a02:ec0::1]:443", None, ("DE", "geoip")),  # IPv6, lower-case code normalised
        ("::ffff:81.2.69.1", None, ("GB", "geoip")),  # v4-mapped
        ("1.130.0.1", None, ("AU", "geoip")),  # registered_country when country is absent
        (PROXY, "81.2.69.142", ("GB", "geoip")),  # through a trusted proxy: X-Forwarded-For
        (PROXY, "1.130.0.1, 81.2.69.142, 127.0.0.1", ("GB", "geoip")),  # right-most untrusted hop
        (CLIENT, "81.2.69.142", ("JP", "tenant")),  # an untrusted peer cannot choose via X-Forwarded-For
        (PROXY, "garbage, 81.2.69.142", ("GB", "geoip")),
        (PROXY, "81.2.69.142, garbage", ("JP", "tenant")),  # unparseable hop: stop at what we trust
        ("192.168.1.10", None, ("JP", "tenant")),  # private: no answer
        ("8.8.8.8", None, ("JP", "tenant")),  # not in the database
        ("5.5.5.5", None, ("JP", "tenant")),  # an invalid code in the database is not used
    ],
)
def test_geoip(geoip_db: Path, peer: str, forwarded: str | None, want: tuple[str, str]) -> None:
    r = OriginResolver("X-Client-Country", geoip_db=geoip_db)
    try:
        headers = Headers({"x-forwarded-for": forwarded} if forwarded else {})
        assert r.resolve(headers, "JP", peer) == want
    finally:
        r.close()


def test_header_beats_geoip(geoip_db: Path) -> None:
    r = OriginResolver("X-Client-Country", geoip_db=geoip_db)
    try:
        h = Headers({"x-client-country": "NO", "x-forwarded-for": "81.2.69.142"})
        assert r.resolve(h, "JP", PROXY) == ("NO", "header")
    finally:
        r.close()


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("Привет! Как у тебя дела сегодня? Расскажи мне что-нибудь интересное.", "ru"),
        ("你好，今天的天气怎么样？我想去公园散步，然后和朋友一起吃饭。", "zh"),
        ("مرحبا، كيف حالك اليوم؟ أتمنى أن تكون بخير وأن يكون يومك سعيدا.", "ar"),
        ("Hello, how are you doing today? Please tell me something interesting.", "en"),
        ("Merhaba, bugün nasılsın? Umarım her şey yolundadır ve günün güzel geçiyordur.", "tr"),
    ],
)
def test_language_detection(detector: LanguageDetector, text: str, lang: str) -> None:
    assert detector.detect(text) == lang


@pytest.mark.parametrize("text", ["", "hi", "   ok   ", "привет", "你好", "12345678901"])
def test_short_text_is_undetermined(detector: LanguageDetector, text: str) -> None:
    assert detector.detect(text) == UNDETERMINED == "und"


def test_only_the_first_sample_chars_are_used(detector: LanguageDetector) -> None:
    english = "The quick brown fox jumps over the lazy dog. " * 20
    assert len(english) > SAMPLE_CHARS
    assert detector.detect(english + "Привет, как у тебя дела сегодня? " * 50) == "en"


def test_prompt_sample_chat_uses_the_last_user_message() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "second"},
                    {"type": "image_url", "image_url": {}},
                    {"type": "text", "text": "question"},
                ],
            },
        ]
    }
    assert prompt_sample(body) == "second  question"
    assert prompt_sample({"messages": [{"role": "system", "content": "only system"}]}) == ""
    assert len(prompt_sample({"messages": [{"role": "user", "content": "x" * 5000}]})) == SAMPLE_CHARS


def test_prompt_sample_completions() -> None:
    assert prompt_sample({"prompt": "Once upon a time"}) == "Once upon a time"
    assert prompt_sample({"prompt": ["first", "second"]}) == "first"
    assert prompt_sample({"prompt": [1, 2, 3]}) == ""
    assert prompt_sample({"prompt": [[1, 2]]}) == ""
    assert prompt_sample({}) == ""
