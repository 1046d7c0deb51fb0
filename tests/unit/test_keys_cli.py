"""``dsched keys create|list|revoke`` against the configured (embedded) store, with no server running."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dsched.app.cli import main
from dsched.libs.apikeys import KeyVerifier, load_pepper
from dsched.libs.settings import Settings
from dsched.libs.store.sqlite import SqliteStore


def dsched(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().out.splitlines()


def test_create_list_revoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DSCHED_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DSCHED_LOG_LEVEL", "WARNING")
    code, out = dsched(
        capsys, "keys", "create", "--tenant", "acme", "--role", "member", "--name", "ci", "--expires-in", "30d"
    )
    assert code == 0
    key = out[-1]  # the last line is the key
    assert key.startswith("dsk_") and len(key) == 60
    key_id = key[4:16]

    async def verify() -> str:
        store = SqliteStore(tmp_path / "store.db")
        await store.startup()
        try:
            record = await KeyVerifier(store, load_pepper(Settings.from_env(data_dir=tmp_path)), 0).verify(key)
            return f"{record.tenant}/{record.role.value}"
        finally:
            await store.shutdown()

    assert asyncio.run(verify()) == "acme/member"  # what a server on this store would accept
    code, out = dsched(capsys, "keys", "list")
    assert code == 0 and out[0].split()[:4] == ["PREFIX", "TENANT", "ROLE", "NAME"]
    assert out[1].split()[:4] == [f"dsk_{key_id}", "acme", "member", "ci"]
    assert key not in "\n".join(out)  # never the secret
    code, out = dsched(capsys, "keys", "revoke", f"dsk_{key_id}")
    assert code == 0 and "revoked" in out[0]
    code, out = dsched(capsys, "keys", "revoke", "dsk_000000000000")
    assert code == 1
    code, out = dsched(capsys, "keys", "create", "--tenant", "acme", "--role", "member", "--expires-in", "soon")
    assert code == 2
