"""The key layout every service shares in the coordination backend (etcd or the embedded leases).

- ``leader`` — the leading coordinator's node id, under its lease (created only if absent: the election).
- ``pickers/<node>`` — a live picker, under the picker's lease; the leader assigns shards to these members.
- ``assignments/<node>`` — ``{"shards": [...], "leader": ..., "epoch": ...}`` written by the leader only
  (guarded by ``leader``); a picker dispatches exactly the shards of its own key while its lease lives.
- ``cancel/<run_id>`` — a short-lived, leased request to the worker running that run to stop it.
- ``workers/<node>`` — a live worker's slots, current runs and metric snapshots, under its lease.
"""

from __future__ import annotations

LEADER_KEY = "leader"
PICKERS_PREFIX = "pickers/"
ASSIGNMENTS_PREFIX = "assignments/"
CANCEL_PREFIX = "cancel/"
WORKERS_PREFIX = "workers/"
