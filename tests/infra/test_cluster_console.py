"""The console leaves off the Ray lines no user can act on, and only those."""

from __future__ import annotations

from infra import cluster

E_LINE = (
    "[2026-12-05 04:39:39,284 E 2319 2348] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: '556427b7' has constructor arguments in the object store and max_restarts > 0. If the ..."
)
W_LINE = "WARNING: 8 PYTHON worker processes have been started on node: fad0 with address: 192.0.2.2, ..."


def test_unactionable_lines_are_dropped_and_the_rest_printed_and_logged(capsys):
    import logging

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    got, logged = [], []

    class Keep(logging.Handler):
        def emit(self, record):
            logged.append(record.getMessage())

    cluster.WORKER_LOG.handlers = [Keep()]
    cluster.WORKER_LOG.setLevel(logging.INFO)
    dispatcher.add_handler("ray_print_logs", got.append)
    try:
        cluster.filter_worker_output()
        cluster.filter_worker_output()  # wrapped once
        dispatcher.emit(
            {
                "pid": 1,
                "actor_name": "RayTrainWorker",
                "lines": [E_LINE, "train_gpt: step 10/20 (50%)  loss 2.1", W_LINE],
            }
        )
        dispatcher.emit({"pid": "raylet", "lines": [W_LINE]})
        from ray._private import worker as ray_worker

        ray_worker.print_to_stdstream(
            {"pid": "raylet", "lines": [W_LINE], "is_err": False}, ignore_prefix=False
        )
    finally:
        dispatcher.remove_handler("ray_print_logs")
        cluster.WORKER_LOG.handlers = []
    assert [d["lines"] for d in got] == [["train_gpt: step 10/20 (50%)  loss 2.1"]]
    assert "PYTHON worker" not in capsys.readouterr().out  # the raylet's path, through Ray's printer
    assert logged == ["(RayTrainWorker 1) train_gpt: step 10/20 (50%)  loss 2.1"]  # the log file's copy
