"""Fetch the JVM servers' jars: ``python -m dsched.libs.servers.jars [kafka cassandra elasticmq]``.

For each server, ``mvn dependency:copy-dependencies`` on ``deploy/jars/<server>/pom.xml`` into
``.cache/jars/<server>`` (or ``$DSCHED_JARS_DIR/<server>``). A server whose folder already holds the jars of
the pom's current content is skipped (a stamp file records the pom's checksum), so ``make test`` pays for
the download once. Maven's own cache (``~/.m2``) makes a re-fetch after a pom change quick.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

from dsched.libs.servers.base import POMS_DIR, ServerError, jars_dir

SERVERS = ("kafka", "cassandra", "elasticmq")
STAMP = ".pom-sha256"


def fetch(server: str) -> bool:
    """Make sure ``server``'s jars are present; True if they had to be fetched."""
    pom = POMS_DIR / server / "pom.xml"
    if not pom.is_file():
        raise ServerError(f"no pom for {server}: {pom}")
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    target = jars_dir(server)
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest and any(target.glob("*.jar")):
        return False
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServerError("mvn not found: install Maven 3 (Debian: apt-get install maven) and Java 17")
    shutil.rmtree(target, ignore_errors=True)  # no stale jars of an older version on the classpath
    target.mkdir(parents=True)
    command = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={target}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise ServerError(f"fetching {server} jars failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    stamp.write_text(digest + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    servers = (argv if argv is not None else sys.argv[1:]) or list(SERVERS)
    for server in servers:
        try:
            fetched = fetch(server)
        except ServerError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{server}: jars {'fetched into' if fetched else 'already in'} {jars_dir(server)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
