"""The wheel installs one import namespace, ``dsched``, with the CQL migrations and the dashboard assets inside,
and ships no tests."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_has_one_top_level_package_with_its_data_and_no_tests(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("dsched-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"dsched"}
    assert "dsched/db/migrations/0001_initial.cql" in names
    assert "dsched/ingestion/ui/index.html" in names
    assert "dsched/libs/models.py" in names and "dsched/app/cli.py" in names
    assert not [name for name in names if "/tests/" in name or name.startswith("tests/")]
