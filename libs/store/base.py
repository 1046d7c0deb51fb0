"""The job store (ScyllaDB's shape): jobs, the sharded time-bucket queue table, runs, dead letters.

Every method maps onto CQL addressed by partition key:

=====================  ==========================================  ===========================================
method                 table / partition                           write kind
=====================  ==========================================  ===========================================
put_jobs               jobs(job_id) + jobs_by_user(user_id)        idempotent upsert of definition columns
update_job_states      jobs(job_id)                                idempotent upsert of state columns
get_jobs               jobs(job_id), one read per id               -
list_jobs              jobs_by_user(user_id) newest first          -
put/delete_entries     job_queue((shard, bucket))                  idempotent
due_entries            job_queue((shard, bucket)) since..until     -
get/advance_checkpoint picker_checkpoints(shard)                   LWT ``IF bucket = ?`` (a claim)
put_runs               job_runs(job_id) + runs_by_id(run_id)       idempotent upsert
claim_runs             run_claims(run_id)                          LWT ``IF NOT EXISTS`` (at-most-once)
run_claimers           run_claims(run_id), one read per id         -
put_dead_letters       dead_letters(user_id)                       idempotent
claim_idempotency_key  idempotency_keys((user_id, key)) TTL 24 h   LWT ``IF NOT EXISTS``
put/get/list_api_keys  api_keys(key_id)                            idempotent upsert
take_rate_token        rate_limits(name)                           LWT ``IF tat = ?`` (compare-and-set)
put/get_signing_...    signing_secrets(tenant)                     idempotent upsert
=====================  ==========================================  ===========================================

No method spans partitions atomically; callers order their writes so that a crash between two of them is
repaired by replaying the same writes (e.g. the writer stores a job before its queue entry, the picker stores a
recurring job's next entry before dispatching the current one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Container, Mapping, Sequence
from typing import NamedTuple

from dsched.libs.apikeys import ApiKey
from dsched.libs.models import BucketEntry, DeadLetter, Job, JobState, Run

# ``since_ms`` of a read from a queue partition's start: below every due time (the smallest 64-bit integer).
NO_LOWER_BOUND = -(2**63)


class RunClaim(NamedTuple):
    """Who holds a run's at-most-once claim, and since when (epoch ms, the claimer's clock)."""

    worker_id: str
    claimed_ms: int


class InvalidCursor(ValueError):
    """A paging cursor this store did not hand out (a client error: the API answers 400)."""


class LayoutMismatch(RuntimeError):
    """The store was created with another shard count or bucket width; starting would lose jobs."""


PROBE_JOB_ID = "~probe"  # never a job id (those are uuids): what JobStore.probe reads


class JobStore(ABC):
    @abstractmethod
    async def startup(self) -> None: ...

    @abstractmethod
    async def shutdown(self) -> None: ...

    async def probe(self) -> None:
        """Serve one cheap read (of a job id that never exists); raises what the store raises when it does not
        answer. Tells an outage from a write the store refuses on its own (a poison record): that one fails while
        the probe succeeds."""
        await self.get_jobs([PROBE_JOB_ID])

    @abstractmethod
    async def check_layout(self, shard_count: int, bucket_ms: int) -> None:
        """Record the layout on first use; raise :class:`LayoutMismatch` if it was created with another."""

    # Jobs -------------------------------------------------------------------------------------------------
    @abstractmethod
    async def put_jobs(self, jobs: Sequence[Job]) -> None:
        """Upsert job definitions. Runtime state (``state``, ``last_run``, ``dispatched_through_ms``) is
        never touched, so replaying a submission cannot undo progress."""

    @abstractmethod
    async def update_job_states(self, updates: Sequence[JobState]) -> None:
        """Set the given (non-None) state fields; idempotent. Unknown job ids are ignored: no read returns them
        (job ids are never reused, so no later job inherits such a state).

        Each field keeps the value decided last (the greatest ``at_us``; on a tie the later write, though Scylla
        breaks ties by value), whatever order updates arrive in, also within one call. Reads return the latest
        decision time among a job's state fields as ``Job.state_at_us``."""

    @abstractmethod
    async def get_jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
        """The jobs that exist among ``job_ids`` (definition and state)."""

    @abstractmethod
    async def list_jobs(
        self,
        user_id: str,
        limit: int,
        cursor: str | None = None,
        status: str | None = None,
        project_id: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """A user's jobs, newest first; returns the page and the cursor of the next page (None at the end)."""

    async def search_jobs(
        self,
        user_id: str,
        text: str,
        limit: int,
        cursor: str | None = None,
        status: str | None = None,
        project_id: str | None = None,
        scan: int = 5000,
    ) -> tuple[list[Job], str | None]:
        """A user's jobs whose id, name, project or payload text/URL contains ``text`` (case-insensitive),
        newest first, reading at most about ``scan`` jobs per call: fewer than ``limit`` matches with a cursor
        means "not found yet, continue from the cursor". This default pages through :meth:`list_jobs`; stores
        that can filter server-side override it (the embedded store does it in one SQL query)."""
        needle = text.lower()
        matches: list[Job] = []
        scanned = 0
        next_cursor = cursor
        page = max(1, min(1000, scan))
        while scanned < scan:
            start = next_cursor
            size = min(page, scan - scanned)
            jobs, next_cursor = await self.list_jobs(user_id, size, start, status=status, project_id=project_id)
            scanned += len(jobs)
            for index, job in enumerate(jobs):
                if job_matches(job, needle):
                    matches.append(job)
                    if len(matches) == limit:
                        if index + 1 < len(jobs):  # resume right after this job
                            _, next_cursor = await self.list_jobs(
                                user_id, index + 1, start, status=status, project_id=project_id
                            )
                        return matches, next_cursor
            if next_cursor is None:
                break
        return matches, next_cursor

    # Queue entries ----------------------------------------------------------------------------------------
    @abstractmethod
    async def put_entries(self, entries: Sequence[BucketEntry]) -> None:
        """Idempotent: the same entry (same primary key) written twice is one entry."""

    async def put_jobs_and_entries(self, jobs: Sequence[Job], entries: Sequence[BucketEntry]) -> None:
        """:meth:`put_jobs`, then :meth:`put_entries` (the writer's store write per batch of log records): an entry
        is never stored unless the jobs before it are. A backend may do both in one round trip (the embedded store:
        one transaction, so either both are stored or neither); if this raises, either may have been stored."""
        if jobs:
            await self.put_jobs(jobs)
        if entries:
            await self.put_entries(entries)

    @abstractmethod
    async def due_entries(
        self, shard: int, bucket_ms: int, until_ms: int, limit: int, *, since_ms: int = NO_LOWER_BOUND
    ) -> list[BucketEntry]:
        """Entries of one partition with ``since_ms <= due_ms <= until_ms``, earliest first.

        A lower bound lets a reader skip what it has already seen: on Scylla a read that starts at the partition's
        beginning steps over the tombstone of every entry deleted in it so far, one that starts at ``since_ms``
        seeks past them."""

    async def due_entries_many(
        self,
        partitions: Sequence[tuple[int, int]],
        until_ms: int,
        limit: int,
        *,
        known: Container[tuple[int, int, int, str, int, int]] = (),
        since: Mapping[tuple[int, int], int] | None = None,
    ) -> dict[tuple[int, int], list[BucketEntry]]:
        """:meth:`due_entries` for several ``(shard, bucket_ms)`` partitions (one query per partition; an
        implementation may run them in one round trip); ``since`` gives a partition's ``since_ms`` (absent: its
        whole start).

        Entries whose :attr:`BucketEntry.key` is in ``known`` (the caller holds them already) are left out of the
        result but still count toward ``limit``: a picker re-reading its look-ahead window each tick pays only
        for what is new."""
        bounds = since or {}
        found = {
            p: await self.due_entries(p[0], p[1], until_ms, limit, since_ms=bounds.get(p, NO_LOWER_BOUND))
            for p in partitions
        }
        return {p: [e for e in entries if e.key not in known] for p, entries in found.items()}

    @abstractmethod
    async def delete_entries(self, entries: Sequence[BucketEntry]) -> None:
        """Delete by primary key; deleting a missing entry is not an error."""

    # Picker checkpoints -----------------------------------------------------------------------------------
    @abstractmethod
    async def get_checkpoint(self, shard: int) -> int | None:
        """The oldest bucket of ``shard`` that may still hold entries (None: never set)."""

    @abstractmethod
    async def advance_checkpoint(self, shard: int, expected: int | None, new: int) -> bool:
        """Compare-and-set the checkpoint (LWT); False if another picker moved it first."""

    # Runs -------------------------------------------------------------------------------------------------
    @abstractmethod
    async def put_runs(self, runs: Sequence[Run]) -> None:
        """Upsert runs by ``run_id`` (the whole record: later writes of the same run win)."""

    @abstractmethod
    async def get_runs(self, run_ids: Sequence[str]) -> dict[str, Run]: ...

    @abstractmethod
    async def list_runs(self, job_id: str, limit: int, cursor: str | None = None) -> tuple[list[Run], str | None]:
        """Runs of a job, newest occurrence first (then highest attempt first)."""

    @abstractmethod
    async def claim_runs(self, run_ids: Sequence[str], worker_id: str) -> set[str]:
        """Claim runs for execution, once ever each (LWT ``IF NOT EXISTS``). Returns the ids this call won."""

    @abstractmethod
    async def run_claimers(self, run_ids: Sequence[str]) -> dict[str, RunClaim]:
        """The claim of each claimed run: its worker id and when it was claimed (ids never claimed are absent)."""

    # Dead letters -----------------------------------------------------------------------------------------
    @abstractmethod
    async def put_dead_letters(self, letters: Sequence[DeadLetter]) -> None: ...

    @abstractmethod
    async def list_dead_letters(
        self, user_id: str, limit: int, cursor: str | None = None
    ) -> tuple[list[DeadLetter], str | None]:
        """A user's dead letters, newest first."""

    @abstractmethod
    async def get_dead_letter(self, user_id: str, dead_letter_id: str) -> DeadLetter | None: ...

    # Idempotent submit ------------------------------------------------------------------------------------
    @abstractmethod
    async def claim_idempotency_key(self, user_id: str, key: str, job_id: str, ttl_s: int) -> str:
        """Bind ``key`` to ``job_id`` unless a live binding exists; returns the job id the key is bound to."""

    # Stats ------------------------------------------------------------------------------------------------
    @abstractmethod
    async def stats(self, now_ms: int) -> dict[str, int]:
        """Counts for ``/queue/stats``: scheduled, due, queued, running, succeeded, failed, dead.

        Exact on the embedded store; maintained counters (approximate) on distributed stores.
        """

    # Tenants: API keys, shared rate limits, usage, signing secrets (issue 12) ------------------------------
    # Not abstract, so stores written before these existed keep working where auth is off (``DSCHED_AUTH=dev``).
    async def put_api_key(self, key: ApiKey) -> None:
        """Insert or replace an API key record (table ``api_keys``, partition ``key_id``)."""
        raise NotImplementedError(f"{type(self).__name__} does not store API keys")

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        """The key record with this id, revoked and expired ones included."""
        raise NotImplementedError(f"{type(self).__name__} does not store API keys")

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (of ``tenant`` when given), newest first."""
        raise NotImplementedError(f"{type(self).__name__} does not store API keys")

    async def revoke_api_key(self, key_id: str, at_ms: int) -> bool:
        """Mark a key revoked from ``at_ms`` on (idempotent: an earlier revocation time is kept); False if the
        key does not exist."""
        raise NotImplementedError(f"{type(self).__name__} does not store API keys")

    async def touch_api_key(self, key_id: str, used_ms: int) -> None:
        """Record that the key was used at ``used_ms`` (best effort, for ``keys list``)."""
        raise NotImplementedError(f"{type(self).__name__} does not store API keys")

    async def take_rate_token(self, name: str, interval_ms: int, burst: int, now_ms: int) -> int:
        """One token of the shared rate limit ``name`` (GCRA: one token per ``interval_ms``, ``burst`` tokens
        may be taken at once). Returns 0 when taken, else the milliseconds until one is available (nothing is
        taken then). Atomic across every process sharing the store (SQLite transaction; Scylla LWT)."""
        raise NotImplementedError(f"{type(self).__name__} does not keep rate limits")

    async def tenant_usage(self, user_id: str) -> tuple[int, int]:
        """``(active jobs, their definition bytes)`` of a tenant, the bytes of payloads offloaded to the blob store
        included (``Payload.size``); active = not deleted and not finished (submitted, scheduled, queued, running
        or paused)."""
        raise NotImplementedError(f"{type(self).__name__} does not report tenant usage")

    async def put_signing_secrets(self, tenant: str, secrets: Sequence[str]) -> None:
        """Replace the tenant's outgoing-HTTP signing secrets (newest first; empty = none)."""
        raise NotImplementedError(f"{type(self).__name__} does not store signing secrets")

    async def get_signing_secrets(self, tenant: str) -> list[str]:
        """The tenant's signing secrets, newest first (empty when none were set)."""
        raise NotImplementedError(f"{type(self).__name__} does not store signing secrets")

    async def get_job_owners(self, job_ids: Sequence[str]) -> dict[str, str]:
        """``job_id → user_id`` of the jobs that exist among ``job_ids`` (for fair dispatch). A store may answer
        without reading whole definitions; this default reads the jobs."""
        return {job_id: job.user_id for job_id, job in (await self.get_jobs(job_ids)).items()}


def job_matches(job: Job, needle: str) -> bool:
    """Whether ``needle`` (lower case) is in the job's id, name, project, payload text or HTTP URL."""
    text = job.payload.text or (job.payload.http.url if job.payload.http is not None else "") or ""
    return any(needle in value.lower() for value in (job.job_id, job.name, job.project_id, text))
