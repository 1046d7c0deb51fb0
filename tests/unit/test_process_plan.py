"""``dsched run all``'s layout over ``DSCHED_PROCESSES`` (app/processes.py ``plan``), and what a child is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsched.app.cli import main
from dsched.app.processes import ChildSpec, child_environment, plan
from dsched.libs.settings import SERVICES, Settings


def test_one_process_runs_everything_here() -> None:
    assert plan(1) == (list(SERVICES), [])


def test_two_processes_put_the_worker_alone_in_a_child() -> None:
    here, children = plan(2)
    assert here == ["ingestion", "writer", "coordinator", "picker"]
    assert children == [ChildSpec("worker-1", ("worker",), index=1)]


def test_three_or_more_put_writer_and_picker_in_a_child_and_the_worker_in_the_rest() -> None:
    here, children = plan(3)
    assert here == ["ingestion", "coordinator"]
    assert children == [
        ChildSpec("writer-picker", ("writer", "picker"), index=1),
        ChildSpec("worker-1", ("worker",), index=2),
    ]
    here, children = plan(5)
    assert here == ["ingestion", "coordinator"]
    assert [(c.name, c.services, c.index, c.node_id_suffix) for c in children] == [
        ("writer-picker", ("writer", "picker"), 1, ""),
        ("worker-1", ("worker",), 2, "-w1"),
        ("worker-2", ("worker",), 3, "-w2"),
        ("worker-3", ("worker",), 4, "-w3"),
    ]
    # Every service runs exactly once, whatever the layout.
    for processes in range(1, 6):
        here, children = plan(processes)
        runs = here + [s for c in children for s in c.services]
        assert sorted(set(runs)) == sorted(SERVICES)
        assert [s for s in runs if s != "worker"] == list(dict.fromkeys(s for s in runs if s != "worker"))
        assert runs.count("worker") == max(1, processes - 2 if processes >= 3 else 1)


def test_a_child_gets_the_parents_settings_its_own_metrics_port_and_node_id(tmp_path: Path) -> None:
    settings = Settings.from_env(data_dir=tmp_path, node_id="box", metrics_port=9100, lease_ttl_s=7.0)
    env = child_environment(settings, ChildSpec("worker-2", ("worker",), index=3, node_id_suffix="-w2"))
    assert env["DSCHED_NODE_ID"] == "box-w2"
    assert env["DSCHED_METRICS_PORT"] == "9103"
    assert env["DSCHED_LEASE_TTL_S"] == "7.0"
    assert env["DSCHED_PROCESSES"] == "1"  # a child never starts children of its own


@pytest.mark.parametrize("argument", ["writer,writer", "writer,nope", "all,worker", ""])
def test_run_refuses_unknown_or_repeated_services(argument: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", argument])
    assert exited.value.code == 2
    assert "distinct services among" in capsys.readouterr().err
