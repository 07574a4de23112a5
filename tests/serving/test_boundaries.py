"""Every timestamp, number and id parameter of the usage and admin routes is validated at the boundary:
out-of-range values are 400 in OpenAI's shape, never a 500 (issue 12).

The app runs in-process (starlette's TestClient runs its lifespan); no worker is needed for these routes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

import serving.app
from serving.app import create_app
from serving.settings import load_settings
from tests.conftest import MODEL, _shared_detector, write_config
from tests.serving.helpers import assert_openai_error

ADMIN = {"Authorization": "Bearer local-admin-token"}
EXTREME_TIMES = [
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00-14:00",
    "9999-12-31T23:59:59+14:00",
    "0001-01-01",
    "9999-12-31",
    "99999999999999999999",
    "1e308",
    "-1",
    "0",
    "253402300800",
    "nan",
    "inf",
    "2026-02-30",
    "2026-01-01T24:00:00",
    "",
    " ",
    "T",
    "0001",
]
HUGE_INTS = [-(2**63), -1, 0, 1, 2**31, 2**62, 2**62 + 1, 2**63, 2**64, 10**30]


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str, str]]:
    directory: Path = tmp_path_factory.mktemp("boundaries")
    cfg = load_settings(
        config_file=write_config(directory, [(MODEL, "w0", "http://127.0.0.1:9")], health_interval_s=60)
    )
    with mock.patch.object(serving.app, "LanguageDetector", return_value=_shared_detector()):
        app = create_app(cfg)
    with TestClient(app, raise_server_exceptions=False) as client:
        t = client.post(
            "/admin/v1/tenants",
            headers=ADMIN,
            json={"id": "bounds", "name": "Bounds", "billing_country": "DE"},
        )
        assert t.status_code == 201, t.text
        key = client.post("/admin/v1/tenants/bounds/keys", headers=ADMIN, json={}).json()
        yield client, key["key"], key["id"]


@pytest.mark.parametrize(
    "path", ["/v1/usage", "/v1/usage/events", "/admin/v1/usage", "/admin/v1/usage/events"]
)
@pytest.mark.parametrize(
    "param,value", [("start", "0001-01-01T00:00:00+14:00"), ("end", "9999-12-31T23:59:59-14:00")]
)
def test_out_of_range_times_are_400_not_500(
    app_client: tuple[TestClient, str, str], path: str, param: str, value: str
) -> None:
    client, api_key, _ = app_client
    headers = ADMIN if path.startswith("/admin") else {"Authorization": f"Bearer {api_key}"}
    r = client.get(path, params={param: value}, headers=headers)
    assert_openai_error(r, 400, type="invalid_request_error", param=param)


def test_out_of_range_key_expiry_is_400_not_500(app_client: tuple[TestClient, str, str]) -> None:
    client, _, _ = app_client
    for value in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"):
        r = client.post("/admin/v1/tenants/bounds/keys", headers=ADMIN, json={"expires_at": value})
        assert_openai_error(r, 400, type="invalid_request_error", param="expires_at")
    ok = client.post(
        "/admin/v1/tenants/bounds/keys", headers=ADMIN, json={"expires_at": "9999-12-31T00:00:00+14:00"}
    )
    assert ok.status_code == 201 and ok.json()["expires_at"].startswith("9999-12-30T10:00:00")


def _times() -> st.SearchStrategy[str]:
    offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
    dates = st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=offsets
    )
    return st.one_of(
        st.sampled_from(EXTREME_TIMES),
        dates.map(lambda d: d.isoformat()),
        st.integers(min_value=-(10**20), max_value=10**20).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(str),
        st.text(max_size=40),
    )


def _ints() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HUGE_INTS), st.integers()).map(str)


def _query(names: dict[str, st.SearchStrategy[str]]) -> st.SearchStrategy[dict[str, str]]:
    return st.fixed_dictionaries({}, optional=names)


ROUTES: list[tuple[str, str, st.SearchStrategy[dict[str, str]]]] = [
    ("tenant", "/v1/usage", _query({"start": _times(), "end": _times(), "group_by": st.text(max_size=60)})),
    (
        "tenant",
        "/v1/usage/events",
        _query({"start": _times(), "end": _times(), "after": _ints(), "limit": _ints()}),
    ),
    (
        "admin",
        "/admin/v1/usage",
        _query(
            {
                "start": _times(),
                "end": _times(),
                "group_by": st.text(max_size=60),
                "tenant": st.text(max_size=80),
                "limit": _ints(),
                "offset": _ints(),
            }
        ),
    ),
    (
        "admin",
        "/admin/v1/usage/events",
        _query(
            {
                "start": _times(),
                "end": _times(),
                "after": _ints(),
                "limit": _ints(),
                "tenant": st.text(max_size=80),
            }
        ),
    ),
    (
        "admin",
        "/admin/v1/audit",
        _query({"tenant_id": st.text(max_size=80), "action": st.text(max_size=80), "limit": _ints()}),
    ),
    ("admin", "/admin/v1/invoices", _query({"period": st.text(max_size=10), "tenant": st.text(max_size=80)})),
    ("tenant", "/v1/invoices", _query({"period": st.from_regex(r"\A\d{4}-\d{2}\Z") | st.text(max_size=10)})),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), data=st.data())
def test_usage_and_admin_queries_with_extreme_values_never_5xx(
    app_client: tuple[TestClient, str, str],
    route: tuple[str, str, st.SearchStrategy[dict[str, str]]],
    data: st.DataObject,
) -> None:
    client, api_key, _ = app_client
    who, path, query = route
    headers = ADMIN if who == "admin" else {"Authorization": f"Bearer {api_key}"}
    r = client.get(path, params=data.draw(query), headers=headers)
    assert r.status_code < 500, (path, r.request.url, r.text)
    if r.status_code >= 400:
        assert set(r.json()) == {"error"}


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(HUGE_INTS),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(EXTREME_TIMES),
    st.text(max_size=30),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_admin_bodies_with_extreme_values_never_5xx(
    app_client: tuple[TestClient, str, str], data: st.DataObject
) -> None:
    client, _, key_id = app_client
    method, path, fields = data.draw(
        st.sampled_from(
            [
                ("POST", "/admin/v1/tenants/bounds/keys", ["name", "expires_at", "expires_in_days"]),
                (
                    "PATCH",
                    "/admin/v1/tenants/bounds/limits",
                    [
                        "rpm",
                        "tpm",
                        "max_tokens",
                        "max_prompt_tokens",
                        "request_timeout_s",
                        "content_retention_days",
                    ],
                ),
                ("PATCH", f"/admin/v1/keys/{key_id}/limits", ["rpm", "tpm", "max_tokens"]),
                ("POST", "/admin/v1/tenants/bounds/budget/top-up", ["amount"]),
                ("POST", "/admin/v1/invoices/run", ["period", "tenant", "issue_date"]),
            ]
        )
    )
    body = data.draw(st.fixed_dictionaries({}, optional={f: JSON_VALUES for f in fields}))
    if path.endswith("/run"):
        body.setdefault("period", "2026-01")
        body["tenant"] = "bounds"
    r = client.request(method, path, json=body, headers=ADMIN)
    assert r.status_code < 500, (path, body, r.text)


@pytest.mark.parametrize("path", ["/admin/v1/tenants/{}", "/admin/v1/tenants/{}/keys", "/admin/v1/keys/{}"])
def test_extreme_ids_are_4xx(app_client: tuple[TestClient, str, str], path: str) -> None:
    client, _, _ = app_client
    for value in ("a" * 10_000, "%00", "key_" + "f" * 100, "..", "é"):
        r = client.get(path.format(value), headers=ADMIN)
        assert 400 <= r.status_code < 500, (path, value, r.text)
