"""Ray Train scaffolding shared by the training stages (``train_vqgan``, ``train_gpt``).

Driver side, :func:`fit` builds the ``TorchTrainer`` (workers with their CPUs/GPU, ``FailureConfig``,
checkpoints kept under the stage's attempt folder, local or ``s3://``) and returns the newest
complete training state; :func:`commit_model` writes the final model as the stage's committed
output (through the stage contract, like any shard) and registers it in MLflow.

Worker side, :class:`Session` gives the training loop what every stage needs the same way:
rank and device, :meth:`Session.restore` (the newest complete checkpoint, also one written just
before a crash that Ray had not recorded), rank-0 logging into the stage's MLflow run,
:meth:`Session.report` (checkpoints in ``models.checkpoint``'s training-state format, reported by
every rank), and :meth:`Session.batches`, the data in a seeded, resumable order.

The order: the input files are permuted by the seed (:func:`read_parquet`), Ray Data keeps the
order of its blocks and splits them among the workers deterministically (``preserve_order``), and
each worker shuffles within a buffer of ``shuffle_buffer`` rows with a seed of (seed, epoch, rank).
The data position (epoch, batches done in it) is part of every checkpoint, so a resumed run sees
the rest of the same epoch, in the same order.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from infra import model_store, storage, tracking
from infra.devices import Placement, Resources, placement
from infra.stage import InputError, StageResult, StageRun

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
_SPEC = "_train_run"  # the key of the TrainRun in the loop config


class Training(Protocol):
    """What a training stage's config says of its run (``train_vqgan``'s and ``train_gpt``'s)."""

    steps: int  # the training budget
    resources: Resources  # workers, CPUs and GPU per worker
    bf16: bool  # autocast in bf16 on GPU
    max_failures: int  # worker failures Ray Train recovers from
    seed: int  # the data order (and the stage's initialisation)
    shuffle_buffer: int  # rows each worker shuffles within, per epoch (0: no local shuffle)


@dataclass(frozen=True)
class TrainRun:
    """What every worker needs from the driver (passed in the loop config)."""

    stage: str  # for the progress lines
    steps: int  # the training budget, for the progress lines
    run_uri: str  # the Ray Train run folder: checkpoints
    run_id: str | None  # the stage's MLflow run (rank 0 logs into it)
    tracking_uri: str
    resources: Resources  # per worker
    bf16: bool  # autocast in bf16 on GPU
    seed: int
    shuffle_buffer: int  # rows each worker shuffles within (0: no local shuffle)


def read_parquet(uris: list[str], columns: list[str], seed: int):
    """A Ray Dataset over ``uris`` (files permuted by ``seed``), for :func:`fit`'s datasets.

    Ray is started here if it is not up yet (through ``ensure_ray``: Ray Data would otherwise
    start it itself with one logical CPU per core, and on 2 cores the training workers then take
    every CPU and the read tasks never run)."""
    import ray

    from infra.cluster import ensure_ray

    ensure_ray()

    order = np.random.default_rng(seed).permutation(len(uris))
    return ray.data.read_parquet([uris[i] for i in order]).select_columns(columns)


def check_batch(
    stage: str, uri: str, rows: int, noun: str, batch_size: int, workers: int, hint: str = ""
) -> None:
    """A global batch of ``batch_size`` split over ``workers`` on ``rows`` training ``noun``: at
    least one row per worker and no more than the rows, else an :class:`InputError` from the plan."""
    if rows < batch_size or batch_size < workers:
        raise InputError(
            f"{uri} holds {rows} training {noun} and {stage}.batch_size={batch_size} is split over "
            f"{workers} workers: the batch must be at least the workers and at most the training {noun}{hint}"
        )


def fit(
    job: StageRun,
    loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    datasets: dict[str, Any],
    training: Training,
) -> dict[str, Any]:
    """Run ``loop(config)`` on ``training.resources.workers`` Ray Train workers (each with
    ``cpus_per_worker`` CPUs and, when ``gpus_per_worker`` > 0, a GPU) for ``training.steps``;
    return the newest training state."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from infra.cluster import ensure_ray

    ensure_ray()
    storage_uri = storage.join(job.out.work_uri, "ray")
    if not storage.is_remote(storage_uri):
        Path(storage_uri).mkdir(parents=True, exist_ok=True)
    name = f"{job.stage}-{job.identity}"
    resources = training.resources
    spec = TrainRun(
        stage=job.stage,
        steps=training.steps,
        run_uri=storage.join(storage_uri, name),
        run_id=job.run_id,
        tracking_uri=tracking.tracking_uri(),
        resources=resources,
        bf16=training.bf16,
        seed=training.seed,
        shuffle_buffer=training.shuffle_buffer,
    )
    trainer = TorchTrainer(
        loop,
        train_loop_config={**config, _SPEC: spec},
        scaling_config=ScalingConfig(
            num_workers=resources.workers or 1,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_uri,
            failure_config=FailureConfig(max_failures=training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (reports, checkpoints, worker-group banners) stay in its log
            # files; the console gets the loop's progress lines (Session.log_metrics)
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    job.nodes = worker_nodes(spec.run_uri)
    state = newest_state(spec.run_uri, result.checkpoint)
    if state is None:
        raise RuntimeError(f"{job.stage}: training finished without a checkpoint under {spec.run_uri}")
    return state


NODES_DIR = "_nodes"


def worker_nodes(run_uri: str) -> dict[str, int]:
    """Ray node id -> how many training workers started there (each start writes a file, so a
    worker restarted on another node after a failure counts on both)."""
    files = storage.list_files(storage.join(run_uri, NODES_DIR))
    return dict(Counter(storage.read_json(uri)["node"] for uri in files))


def _read_state(uri: str, device: str = "cpu") -> dict[str, Any]:
    from models.checkpoint import training_state_from_bytes

    return training_state_from_bytes(storage.read_bytes(storage.join(uri, STATE_FILE)), device)


def newest_state(run_uri: str, checkpoint: Any = None, device: str = "cpu") -> dict[str, Any] | None:
    """The training state of the highest step among Ray's ``checkpoint`` and the complete
    checkpoints under ``run_uri``.

    Ray resumes from the checkpoints it recorded; a process killed between a checkpoint's upload and
    its recording (the driver, or a worker) leaves one Ray does not know about. Looking for it too
    loses no finished step. Folder names carry their creation time, so they sort by age.
    """
    states = []
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            states.append(_read_state(str(d), device))
    names = [
        d for d in storage.list_dirs(run_uri) if d.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_")
    ]
    for d in sorted(names, reverse=True):
        try:
            states.append(_read_state(d, device))
            break
        except Exception:  # noqa: BLE001 - missing or a partial copy: try the next older one
            continue
    return max(states, key=lambda s: int(s["step"])) if states else None


def commit_model(
    job: StageRun,
    model: Any,
    *,
    counts: dict[str, int],
    figures: dict[str, float],
    extra: dict[str, Any],
    register_name: str | None,
    register_alias: str,
    step: int | None = None,
) -> StageResult:
    """Claim the output, write ``model`` (native checkpoint carrying ``extra``) into the attempt,
    register it as ``models:/<register_name>@<register_alias>`` with ``figures`` as version tags,
    commit (the figures logged at training step ``step``). A run of this identity that committed
    first wins: this run then writes and registers nothing."""
    from models import checkpoint

    if (winner := job.out.claim()) is not None:
        return job.lost_to(winner)
    data = checkpoint.to_bytes(model, {**extra, "figures": figures})  # the registered copy: these bytes
    marker = job.out.write_file(0, MODEL_FILE, data)
    registered = job.out.inherited  # registered by a run that died committing: not twice
    if register_name and registered is None:
        registered = model_store.register(data, register_name, register_alias, tags=figures)
        job.out.renew_claim(registered)
    return job.commit([marker], counts=counts, figures=figures, extra=extra, registered=registered, step=step)


class Session:
    """A training loop's view of its worker (see the module docstring)."""

    def __init__(self, config: dict[str, Any]):
        import ray.train

        self.spec: TrainRun = config[_SPEC]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.place: Placement = placement(self.spec.resources, "auto" if self.spec.bf16 else "fp32")
        self.device = self.place.device
        self.position = {"epoch": 0, "batch": 0}  # the data position: epoch, and batches done in it
        self.resumed_from: int | None = None
        self._tracking = False
        self._meter = (time.perf_counter(), 0)
        self._progress: tuple[float, int] | None = None  # (time, step) of the first line: for the ETA
        self._active: set[str] = set()  # metrics that were ever nonzero (the console shows only those)
        from infra.cluster import node_id

        node = node_id()
        storage.write_json(
            storage.join(self.spec.run_uri, NODES_DIR, f"rank{self.rank}-{node[:16]}-{time.time_ns()}.json"),
            {"node": node, "rank": self.rank},
        )

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def restore(self) -> dict[str, Any] | None:
        """The state to resume from (None on a fresh start); the data position comes with it."""
        import ray.train

        state = newest_state(self.spec.run_uri, ray.train.get_checkpoint(), self.device)
        if state is not None:
            self.position = dict(state["data"])
            self.resumed_from = int(state["step"])
        return state

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Rank 0 logs into the stage's MLflow run while this is open; other ranks log nothing."""
        run_id = self.spec.run_id if self.is_chief else None
        with tracking.resume_run(run_id, self.spec.tracking_uri) as active:
            self._tracking = active
            if self.resumed_from is not None:
                self.log_metrics({"train/resumed_from_step": self.resumed_from}, step=self.resumed_from)
            try:
                yield
            finally:
                self._tracking = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Rank 0: into the stage's MLflow run, and a progress line on the console
        (``train_gpt: step 200/400 (50%, 3m10s left)  loss 2.61  tokens_per_s 3.2e+03``), both with
        the terms that are active: a metric that has been 0 at every line so far (a loss term not
        started yet, as the adversarial terms before the discriminator starts, or the weight of a
        switched-off term) is neither printed nor charted until it moves."""
        if self._tracking:
            self._active |= {k for k, v in metrics.items() if v != 0}
            active = {k: v for k, v in metrics.items() if k in self._active}
            tracking.log_metrics(active, step=step)
            shown = "  ".join(f"{k.split('/', 1)[-1]} {v:.4g}" for k, v in active.items())
            log.info("%s: step %d/%d%s  %s", self.spec.stage, step, self.spec.steps, self._eta(step), shown)

    def _eta(self, step: int) -> str:
        """`` (50%, 3m10s left)`` from the pace since the first line of this process."""
        now, total = time.perf_counter(), max(self.spec.steps, 1)
        if self._progress is None or step <= self._progress[1]:
            self._progress = self._progress or (now, step)
            return f" ({100 * step // total}%)"
        t0, s0 = self._progress
        left = (now - t0) / (step - s0) * max(total - step, 0)
        m, sec = divmod(int(round(left)), 60)
        return f" ({100 * step // total}%, {f'{m}m{sec:02d}s' if m else f'{sec}s'} left)"

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        if self._tracking:
            tracking.log_image(image, artifact_file)

    def count(self, items: int) -> None:
        """Count ``items`` this worker trained on (for :meth:`items_per_s`)."""
        t0, n = self._meter
        self._meter = (t0, n + items)

    def items_per_s(self) -> float:
        """Items per second of all workers together since the last call (or the start)."""
        t0, n = self._meter
        now = time.perf_counter()
        self._meter = (now, 0)
        return n * self.world / max(now - t0, 1e-9)

    def report(self, step: int, metrics: dict[str, float], state: dict[str, Any] | None = None) -> None:
        """Every rank reports; rank 0 attaches ``state`` (with the data position) as a checkpoint, in
        ``models.checkpoint``'s training-state format."""
        import ray.train

        from models.checkpoint import training_state_to_bytes

        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if state is not None and self.is_chief:
                full = {**state, "data": dict(self.position)}
                (Path(d) / STATE_FILE).write_bytes(training_state_to_bytes(full))
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report({"step": step, **metrics}, checkpoint=ckpt)

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a decision only the chief can make, e.g. stopping early
        on its validation: every rank must leave the loop at the same step). Every rank calls it."""
        import torch
        import torch.distributed as dist

        if self.world == 1 or not (dist.is_available() and dist.is_initialized()):
            return flag
        t = torch.tensor([int(flag)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, 0)
        return bool(t.item())

    def _shuffle_seed(self, epoch: int) -> int:
        h = hashlib.sha256(f"{self.spec.seed}:{epoch}:{self.rank}".encode()).digest()
        return int.from_bytes(h[:4], "little")

    def batches(self, name: str, batch_size: int) -> Iterator[dict[str, Any]]:
        """This worker's batches of dataset ``name``, epoch after epoch, from the data position
        (restored with the state; every checkpoint records it)."""
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        buffer = self.spec.shuffle_buffer or None
        position = self.position
        while True:
            skip, seen = position["batch"], 0
            for batch in shard.iter_torch_batches(
                batch_size=batch_size,
                drop_last=True,
                device=self.device,
                local_shuffle_buffer_size=buffer,
                local_shuffle_seed=self._shuffle_seed(position["epoch"]) if buffer else None,
            ):
                seen += 1
                if seen <= skip:  # resuming mid-epoch: these were trained on before the checkpoint
                    continue
                position["batch"] = seen
                yield batch
            if seen == 0:
                raise InputError(
                    f"a training worker got no full batch of {batch_size} rows: the training data is "
                    f"smaller than the batch size times the {self.world} workers"
                )
            position.update(epoch=position["epoch"] + 1, batch=0)
