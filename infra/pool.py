"""Map a stage's work items over Ray: one item (an input shard, a range of sample indices, ...) per
call, each call writing its output shard and its marker (see ``infra.stage.StageOutput``).

The assignment is deterministic (output shard i <- work item i), so a rerun after a crash runs only
the items whose markers are missing, and writes the same bytes. A :class:`Worker` subclass runs on
a Ray Data actor pool (the model is loaded once per actor in ``__init__``); a plain function
``fn(index, item, *args) -> ShardMarker`` runs as one Ray task per item (no actor start-up, for
work that loads nothing, like ingest). Progress is logged as items finish.

An actor pool starts work only once all its actors are up (``ACTORS_START_TIMEOUT_S``): Ray Data
otherwise dispatches to the first actor that is ready, which on a cluster can take every shard
while the actors on other nodes still load their model (measured on two nodes: one node wrote all
4 tokenize shards). A pool the cluster cannot fit then fails with Ray's "enough resources" error
after that time instead of waiting forever.

On CPU prefer more actors of one CPU each over fewer actors of several: Ray Data calls an actor's
batches from a thread pool, and OpenMP parallel regions started from a thread other than the
process's first ran small matrix products 2-3x slower than from the main thread (measured: a
64x128x384 linear at 2 threads, 3.9 vs 1.3 s per 20k calls; at 1 thread both 1.8 s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from infra import storage
from infra.devices import Resources
from infra.stage import FileEntry, Manifest, ShardMarker, StageOutput, read_file

log = logging.getLogger(__name__)
# map_items passes max_restarts as a plain remote argument, which Ray 2.60 takes (its only way to
# set it) with a deprecation warning: kept off the console, for this module's calls only
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", module=__name__)
ACTORS_START_TIMEOUT_S = 600


class Worker:
    """Subclass with ``__init__(self, *args)`` (load the model) and ``process(index, item) -> marker``."""

    def process(self, index: int, item: dict[str, Any]) -> ShardMarker:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        markers = [self.process(int(i), json.loads(s)) for i, s in zip(batch["index"], batch["item"])]
        return {"marker": [json.dumps(m.to_json()) for m in markers]}


def _task_call(batch: dict[str, np.ndarray], fn: Callable, args: tuple) -> dict[str, Any]:
    markers = [fn(int(i), json.loads(s), *args) for i, s in zip(batch["index"], batch["item"])]
    return {"marker": [json.dumps(m.to_json()) for m in markers]}


def file_items(m: Manifest, files: list[FileEntry]) -> list[dict[str, Any]]:
    """The work items of a file-to-file stage: input file i of the committed output ``m`` ->
    output shard i; each item carries the file's manifest entry, so the worker verifies it."""
    return [{"uri": storage.join(m.output_uri, f.path), "entry": dataclasses.asdict(f)} for f in files]


def read_item(item: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
    """The input file of a :func:`file_items` item, checked against its manifest entry."""
    return read_file(item["uri"], FileEntry(**item["entry"]), columns)


def map_items(
    worker: type[Worker] | Callable[..., ShardMarker],
    args: tuple,
    items: list[dict[str, Any]],
    out: StageOutput,
    resources: Resources,
    *,
    what: str = "shards",
) -> tuple[list[ShardMarker], int]:
    """Run ``worker`` over the items whose output is not done yet; returns every item's marker and
    how many were already done (reused from an earlier, interrupted run).

    ``items`` are small JSON-able dicts (no data: workers read their input themselves).
    ``resources.workers``: actors in the pool, or tasks in flight for a function (None: as the CPUs
    allow); each takes ``cpus_per_worker`` and ``gpus_per_worker``.
    """
    import ray

    from infra.cluster import ensure_ray

    done = out.done_shards()
    pending = [i for i in range(len(items)) if i not in done]
    log.info("%s: %d %s, %d already done", out.stage, len(items), what, len(items) - len(pending))
    if pending:
        ensure_ray()
        ray.data.DataContext.get_current().wait_for_min_actors_s = ACTORS_START_TIMEOUT_S
        rows = [{"index": i, "item": json.dumps(items[i])} for i in pending]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        options: dict[str, Any] = dict(
            batch_size=1,
            batch_format="numpy",
            num_cpus=resources.cpus_per_worker,
            num_gpus=resources.gpus_per_worker,
        )
        concurrency = resources.workers
        if isinstance(worker, type):
            ds = ds.map_batches(
                worker,
                fn_constructor_args=args,
                # no more actors than items: an idle actor only costs its start (and Ray Data warns)
                compute=ray.data.ActorPoolStrategy(
                    size=min(concurrency or 1, len(pending)), max_tasks_in_flight_per_actor=1
                ),
                # Ray Data restarts a dead actor forever by default, from constructor arguments it
                # keeps in the object store, and Ray's C++ core prints an error line per pool for
                # that (ray-project/ray#53727). Not restarting costs nothing here: a dead actor fails
                # the map, the shards done so far stay, and the stage's rerun (the pipeline's
                # run.stage_retries) does only the rest.
                max_restarts=0,
                **options,
            )
        else:
            ds = ds.map_batches(
                _task_call,
                fn_kwargs={"fn": worker, "args": args},
                compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
                **options,
            )
        t0, rows_done = time.perf_counter(), 0
        for k, row in enumerate(ds.iter_rows(), start=1):
            marker = ShardMarker.from_json(json.loads(row["marker"]))
            done[marker.index] = marker
            out.committed()  # another identity committed here meanwhile: stop now, not at the end
            rows_done += marker.rows
            elapsed = time.perf_counter() - t0
            log.info(
                "%s: %s %d/%d done, %d rows in %.0f s (%.1f rows/s)",
                out.stage,
                what[:-1] if what.endswith("s") else what,
                k,
                len(pending),
                rows_done,
                elapsed,
                rows_done / max(elapsed, 1e-9),
            )
    return [done[i] for i in range(len(items))], len(items) - len(pending)
