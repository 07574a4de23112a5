"""Settings: YAML + env, the model catalogue, and production mode's refusal of default secrets."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serving.settings import (
    DEFAULT_ADMIN_TOKEN,
    DEFAULT_SECRET,
    Catalogue,
    ConfigError,
    ModelSpec,
    WorkerSpec,
    load_settings,
)

REPO = Path(__file__).resolve().parents[2]
STRONG_SECRET = "s" * 40
STRONG_ADMIN = "a" * 30


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TOKENPORT_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, config: dict[str, object], models: Mapping[str, object] | None = None) -> Path:
    path = tmp_path / "tokenport.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    if models is not None:
        (tmp_path / "models.yaml").write_text(yaml.safe_dump(models), encoding="utf-8")
    return path


MODELS = {
    "default_model": "m1",
    "models": [
        {"name": "m1", "workers": [{"id": "w1", "base_url": "http://10.0.0.1:8000/", "region": "r1"}]},
        {"name": "m2", "workers": [{"id": "w2", "port": 8101}]},
    ],
}


def test_yaml_file_and_catalogue_are_loaded(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "data_dir": str(tmp_path / "d"),
            "gateway": {"port": 9001, "max_body_bytes": 4096},
            "workers": {"health_interval_s": 0.5},
        },
        MODELS,
    )
    s = load_settings(config_file=path)
    assert s.gateway.port == 9001 and s.gateway.max_body_bytes == 4096
    assert s.workers.health_interval_s == 0.5
    assert s.data_dir == (tmp_path / "d").resolve()
    assert s.db_url == f"sqlite:///{(tmp_path / 'd' / 'tokenport.db').resolve()}"
    assert s.config_dir == tmp_path.resolve()
    assert [m.name for m in s.catalogue.models] == ["m1", "m2"]
    m1, m2 = s.catalogue.models
    assert m1.workers[0].url() == "http://10.0.0.1:8000" and not m1.workers[0].launched
    assert m2.workers[0].url() == "http://127.0.0.1:8101" and m2.workers[0].launched
    assert s.catalogue.get("m2") is m2 and s.catalogue.get("nope") is None


def test_env_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {"gateway": {"port": 9001}})
    monkeypatch.setenv("TOKENPORT_GATEWAY__PORT", "9100")
    assert load_settings(config_file=path).gateway.port == 9100


@pytest.mark.parametrize(
    "config",
    [
        {"gateway": {"port": "not-a-port"}},
        {"gateway": {"port": 70000}},
        {"gateway": {"max_body_bytes": 10}},
        {"workers": {"health_interval_s": 0}},
        {"mode": "staging"},
        {"no_such_setting": 1},
    ],
)
def test_bad_yaml_field_is_a_config_error_naming_the_file(tmp_path: Path, config: dict[str, object]) -> None:
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    assert str(path) in str(info.value)
    field = next(iter(config))
    assert field in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(config_file=tmp_path / "absent.yaml")


def test_bad_models_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = _write(tmp_path, {}, {"models": [{"name": "m1", "workers": [{"id": "w", "port": "x"}]}]})
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path)
    assert str(tmp_path / "models.yaml") in str(info.value)
    (tmp_path / "models.yaml").write_text("models: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"models.yaml"):
        load_settings(config_file=path)


@pytest.mark.parametrize(
    ("secret", "admin"),
    [
        (DEFAULT_SECRET, STRONG_ADMIN),
        ("short", STRONG_ADMIN),
        (STRONG_SECRET, DEFAULT_ADMIN_TOKEN),
        (STRONG_SECRET, "short"),
    ],
)
def test_production_refuses_default_or_weak_secrets(tmp_path: Path, secret: str, admin: str) -> None:
    path = _write(tmp_path, {"mode": "production", "secret_key": secret, "admin_token": admin})
    with pytest.raises(ConfigError, match="production mode needs") as info:
        load_settings(config_file=path)
    assert str(path) in str(info.value)


def test_production_refuses_defaults_set_by_env_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {})
    monkeypatch.setenv("TOKENPORT_MODE", "production")
    with pytest.raises(ConfigError, match="TOKENPORT_SECRET_KEY"):
        load_settings(config_file=path)
    monkeypatch.setenv("TOKENPORT_SECRET_KEY", STRONG_SECRET)
    monkeypatch.setenv("TOKENPORT_ADMIN_TOKEN", STRONG_ADMIN)
    s = load_settings(config_file=path)
    assert s.mode == "production" and s.secret_key == STRONG_SECRET


def test_local_mode_accepts_the_defaults(tmp_path: Path) -> None:
    s = load_settings(config_file=_write(tmp_path, {}))
    assert s.mode == "local" and s.secret_key == DEFAULT_SECRET


def test_catalogue_rejects_duplicate_model_names() -> None:
    with pytest.raises(ValidationError, match="model names must be unique"):
        Catalogue(models=[ModelSpec(name="m"), ModelSpec(name="m")])


def test_catalogue_rejects_duplicate_worker_ids_and_unknown_default() -> None:
    with pytest.raises(ValidationError, match="worker ids must be unique"):
        Catalogue(
            models=[
                ModelSpec(name="a", workers=[WorkerSpec(id="w", port=1)]),
                ModelSpec(name="b", workers=[WorkerSpec(id="w", port=2)]),
            ]
        )
    with pytest.raises(ValidationError, match="default_model"):
        Catalogue(default_model="c", models=[ModelSpec(name="a")])


@pytest.mark.parametrize(
    "worker",
    [
        {"id": "w", "port": 8100, "base_url": "http://x:1"},
        {"id": "w"},
    ],
)
def test_worker_needs_exactly_one_of_port_and_base_url(worker: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="exactly one of port"):
        WorkerSpec.model_validate(worker)


def test_duplicate_models_in_the_models_file_is_a_config_error(tmp_path: Path) -> None:
    models = {
        "models": [
            {"name": "m", "workers": [{"id": "a", "port": 1}]},
            {"name": "m", "workers": [{"id": "b", "port": 2}]},
        ]
    }
    path = _write(tmp_path, {}, models)
    with pytest.raises(ConfigError, match="model names must be unique"):
        load_settings(config_file=path)
    models = {"models": [{"name": "m", "workers": [{"id": "a", "port": 1, "base_url": "http://h:1"}]}]}
    path = _write(tmp_path, {}, models)
    with pytest.raises(ConfigError, match="exactly one of port"):
        load_settings(config_file=path)


@pytest.mark.parametrize("name", ["", "-starts-with-dash", "has space", "x" * 200])
def test_model_names_are_restricted(name: str) -> None:
    with pytest.raises(ValidationError):
        ModelSpec(name=name)


# --- safe defaults (issue 12) -------------------------------------------------------------
def test_local_mode_binds_loopback_only_with_the_default_secrets(tmp_path: Path) -> None:
    from serving.settings import check_bind

    s = load_settings(_write(tmp_path, {"data_dir": str(tmp_path)}))
    assert s.mode == "local" and not s.production_ready
    for host in ("0.0.0.0", "::", "192.168.1.10", "gateway.example"):
        with pytest.raises(ConfigError, match="binds loopback only"):
            check_bind(s, host)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        (warning,) = check_bind(s, host)  # allowed, with a warning about the default admin token
        assert DEFAULT_ADMIN_TOKEN in warning
    exposed = s.gateway.model_copy(update={"metrics_host": "0.0.0.0"})
    exposed_metrics = s.model_copy(update={"gateway": exposed})
    with pytest.raises(ConfigError, match=r"0\.0\.0\.0"):
        check_bind(exposed_metrics, "127.0.0.1")


def test_a_network_bind_needs_the_production_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.settings import check_bind

    monkeypatch.setenv("TOKENPORT_SECRET_KEY", STRONG_SECRET)
    only_secret = load_settings(_write(tmp_path, {"data_dir": str(tmp_path)}))
    with pytest.raises(ConfigError):  # the default admin token is refused outside loopback
        check_bind(only_secret, "0.0.0.0")
    monkeypatch.setenv("TOKENPORT_ADMIN_TOKEN", STRONG_ADMIN)
    complete = load_settings(_write(tmp_path, {"data_dir": str(tmp_path)}))
    assert complete.production_ready and check_bind(complete, "0.0.0.0") == []


def test_the_gateway_command_refuses_a_network_host_in_default_local_mode(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    config = str(Path("configs/tokenport.yaml").resolve())
    env = {"TOKENPORT_DATA_DIR": str(tmp_path), "TOKENPORT_CONFIG": config}
    res = CliRunner().invoke(app, ["gateway", "--host", "0.0.0.0", "--port", "1"], env=env)
    assert res.exit_code == 2 and "binds loopback only" in res.output


def test_no_proxy_is_trusted_by_default(tmp_path: Path) -> None:
    from metering.geo import OriginResolver

    s = load_settings(_write(tmp_path, {"data_dir": str(tmp_path)}))
    assert s.gateway.trusted_proxies == []
    origin = OriginResolver(s.gateway.origin_country_header, s.gateway.trusted_proxies, s.gateway.geoip_db)
    # a local client cannot set its own origin country (export statistics follow it)
    assert origin.resolve({"x-client-country": "US"}, "KZ", peer="127.0.0.1") == ("KZ", "tenant")
    trusting = OriginResolver(s.gateway.origin_country_header, ["127.0.0.1/32"], None)
    assert trusting.resolve({"x-client-country": "US"}, "KZ", peer="127.0.0.1") == ("US", "header")


def test_one_price_book_setting_with_the_deprecated_alias(tmp_path: Path) -> None:
    default = load_settings(_write(tmp_path, {"data_dir": str(tmp_path)}))
    assert default.price_book_path == tmp_path / "billing" / "price_books.yaml"  # next to the config file
    alias = load_settings(_write(tmp_path, {"data_dir": str(tmp_path), "limits": {"price_book": "old.yaml"}}))
    assert alias.price_book_path == tmp_path / "old.yaml"
    both = load_settings(
        _write(
            tmp_path,
            {
                "data_dir": str(tmp_path),
                "limits": {"price_book": "old.yaml"},
                "billing": {"price_book": "/etc/tokenport/prices.yaml"},
            },
        )
    )
    assert both.price_book_path == Path("/etc/tokenport/prices.yaml")


def test_a_tool_call_parser_reaches_the_worker_command_and_the_capabilities(tmp_path: Path) -> None:
    """vLLM answers 400 to `tool_choice` without a parser: the catalogue's `tool_call_parser` starts the
    chat worker with one (never the embedding worker), and GET /v1/models says `tools`."""
    from serving.workers.supervisor import worker_command

    settings = load_settings(REPO / "configs" / "tokenport.yaml", data_dir=tmp_path)
    chat = settings.catalogue.get("smollm2-135m-instruct")
    embed = settings.catalogue.get("smollm2-135m-embed")
    assert chat is not None and embed is not None and chat.tool_call_parser == "hermes"
    cmd = worker_command(settings, chat, chat.workers[0])
    assert cmd[cmd.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in cmd
    embed = embed.model_copy(update={"tool_call_parser": "hermes"})
    assert "--tool-call-parser" not in worker_command(settings, embed, embed.workers[0])
    plain = chat.model_copy(update={"tool_call_parser": None})
    assert "--tool-call-parser" not in worker_command(settings, plain, plain.workers[0])
    with pytest.raises(ValueError, match="tool_call_parser"):
        Catalogue.model_validate({"models": [{"name": "m", "tool_call_parser": "hermes; rm -rf /"}]})


def test_an_embedding_variant_counts_tokens_with_the_tokenizer_of_its_weights(tmp_path: Path) -> None:
    from serving.workers.prepare import tokenizer_folders

    settings = load_settings(REPO / "configs" / "tokenport.yaml", data_dir=tmp_path)
    folders = tokenizer_folders(settings, ["smollm2-135m-embed", "smollm2-135m-instruct", "org/other"])
    assert (
        folders["smollm2-135m-embed"]
        == folders["smollm2-135m-instruct"]
        == settings.models_dir / "smollm2-135m-instruct"
    )
    assert folders["org/other"] == settings.models_dir / "org--other"
