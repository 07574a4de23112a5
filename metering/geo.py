"""Origin-country attribution: where a request came from (on the usage event, with its source)."""

from __future__ import annotations

from collections.abc import Mapping

from metering.tenants import valid_country


class InvalidCountry(ValueError):
    pass


class OriginResolver:
    """Decides a request's origin country.

    Order: the trusted header (ISO 3166-1 alpha-2, malformed values are an error, not ignored),
    else the tenant's billing country. The event records which source decided.
    """

    def __init__(self, header: str) -> None:
        self.header = header.lower()

    def resolve(self, headers: Mapping[str, str], billing_country: str) -> tuple[str, str]:
        raw = headers.get(self.header)
        if raw is not None:
            code = raw.strip().upper()
            if len(code) != 2 or not valid_country(code):
                raise InvalidCountry(
                    f"{self.header} must be an ISO 3166-1 alpha-2 country code, got {raw[:16]!r}")
            return code, "header"
        return billing_country, "tenant"
