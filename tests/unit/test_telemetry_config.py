"""``telemetry.otlp_endpoint`` may carry the collector's credentials (``https://tenant:token@host``,
as some hosted collectors are given): ``vapora config`` (text and ``--json``) and the config's
``repr`` show it with the secret masked, as they show NATS URLs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vapora.config import TelemetryConfig, config_command, redact_url

GUIDE_TOML = Path(__file__).parent.parent / "fixtures" / "llm-router.toml"


def _with_endpoint(tmp_path: Path, endpoint: str) -> str:
    path = tmp_path / "vapora.toml"
    path.write_text(
        GUIDE_TOML.read_text()
        + f'\n[telemetry]\nenabled = true\nexporter = "otlp"\notlp_endpoint = "{endpoint}"\n'
    )
    return str(path)


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=30),
    st.sampled_from(["https://tenant:{s}@otlp.example.com", "http://{s}@collector:4318"]),
)
def test_no_otlp_endpoint_credential_appears_in_vapora_config_or_a_repr(
    tmp_path_factory: pytest.TempPathFactory, secret: str, form: str
) -> None:
    endpoint = form.format(s="tok" + secret)
    path = _with_endpoint(tmp_path_factory.mktemp("config"), endpoint)
    code, as_json = config_command(path, as_json=True, env={})
    assert code == 0
    _, as_text = config_command(path, as_json=False, env={})
    config = TelemetryConfig(enabled=True, otlp_endpoint=endpoint)
    for shown in (as_json, as_text, repr(config), str(config)):
        assert "tok" + secret not in shown
    shown_endpoint = json.loads(as_json)["telemetry"]["otlp_endpoint"]
    assert shown_endpoint == redact_url(endpoint) and "***@" in shown_endpoint
    assert redact_url(endpoint) in repr(config)


def test_an_otlp_endpoint_without_credentials_is_shown_as_it_is(tmp_path: Path) -> None:
    endpoint = "http://collector:4318"
    code, as_json = config_command(_with_endpoint(tmp_path, endpoint), as_json=True, env={})
    assert code == 0 and json.loads(as_json)["telemetry"]["otlp_endpoint"] == endpoint
    assert f"otlp_endpoint={endpoint!r}" in repr(TelemetryConfig(otlp_endpoint=endpoint))
