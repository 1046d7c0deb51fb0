"""The README is part of the product: every setting it must document, it does."""

from __future__ import annotations

from pathlib import Path

from dsched.libs.settings import Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_config_table() -> None:
    missing = [name for name in Settings.model_fields if f"`DSCHED_{name.upper()}`" not in README]
    assert missing == []


def test_readme_shows_the_two_commands() -> None:
    assert "make run" in README and "make test" in README
