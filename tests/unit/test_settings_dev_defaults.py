"""``dsched run all`` turns cmd: and private HTTP on only when nothing says otherwise, in any letter case."""

from __future__ import annotations

import pytest

from dsched.libs.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper() in ("DSCHED_ALLOW_CMD", "DSCHED_ALLOW_PRIVATE_HTTP"):
            monkeypatch.delenv(name)


def test_dev_defaults_turn_both_on_when_unset() -> None:
    settings = Settings.from_env().with_dev_defaults()
    assert settings.allow_cmd and settings.allow_private_http
    assert not Settings.from_env().allow_cmd  # production default


@pytest.mark.parametrize("name", ["DSCHED_ALLOW_CMD", "dsched_allow_cmd", "Dsched_Allow_Cmd"])
@pytest.mark.parametrize("value", ["false", "FALSE", "0", "off"])
def test_an_explicit_false_in_any_case_keeps_cmd_off(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    settings = Settings.from_env().with_dev_defaults()
    assert settings.allow_cmd is False
    assert settings.allow_private_http is True  # the other one still gets its dev default


def test_lower_case_private_http_false_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("dsched_allow_private_http", "false")
    assert Settings.from_env().with_dev_defaults().allow_private_http is False


def test_an_explicit_override_wins_over_dev_defaults() -> None:
    settings = Settings.from_env(allow_cmd=False, allow_private_http=False).with_dev_defaults()
    assert (settings.allow_cmd, settings.allow_private_http) == (False, False)


def test_output_cap_default_is_at_least_10_mib() -> None:
    assert Settings.from_env().output_cap_bytes >= 10 * 1024 * 1024
