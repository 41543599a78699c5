"""endpoints.http and the [http] section: parsed, validated with a message that says what to change."""

from __future__ import annotations

import pytest

from common import config as config_mod


def test_defaults_and_overrides():
    config = config_mod.load(None, ["model.path=tiny", "endpoints.http=[::1]:9000", "http.default_max_tokens=64"])
    assert config.endpoints.http_host_port() == ("::1", 9000)
    assert config.http.default_max_tokens == 64 and config.http.max_body_bytes == 1 << 20
    assert config_mod.Endpoints().http_host_port() == ("127.0.0.1", 8000)
    assert "[http]" in config_mod.dumps(config)


@pytest.mark.parametrize("override, message", [
    ("endpoints.http=8000", "endpoints.http"),
    ("endpoints.http=localhost:0", "endpoints.http"),
    ("endpoints.http=tcp://127.0.0.1:8000", "endpoints.http"),
    ("http.max_body_bytes=0", "http.max_body_bytes"),
    ("http.request_timeout_s=-1", "http.request_timeout_s"),
    ("http.unknown=1", "unknown key"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(config_mod.ConfigError, match=message):
        config_mod.load(None, [override])
