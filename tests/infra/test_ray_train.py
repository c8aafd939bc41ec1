"""The Ray Train scaffolding (real Ray Train, 2 workers): the training data comes in a seeded,
shuffled order across and within files, a new order each epoch, and a run resumed after a worker
crash sees exactly the rows the crashed attempt saw (one training: the attempt that crashes writes
the batch it drew at the crash step beside the checkpoints)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pyarrow as pa
import pytest
import ray

from infra import ray_train, storage
from infra.config import output_field
from infra.devices import Resources
from infra.stage import StageRun

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loop below runs in Ray workers

CLASSES, PER_CLASS, BATCH, WORKERS = 4, 16, 4, 2  # 32 rows per worker: 8 global batches of 8 per epoch


@dataclass(frozen=True)
class ToyConfig:
    output_uri: str = output_field()
    seed: int = 0
    steps: int = 12
    resources: Resources = Resources(workers=WORKERS, cpus_per_worker=0.5)
    bf16: bool = False
    max_failures: int = 0
    shuffle_buffer: int = 32


def toy_loop(config: dict) -> None:
    """Records the global batches (every worker's rows, gathered) in its checkpoints; crashes once
    at step ``crash_at``."""
    import torch
    import torch.distributed as dist

    session = ray_train.Session(config)
    state = session.restore()
    step, rows = (int(state["step"]), state["rows"].tolist()) if state else (0, [])
    for batch in session.batches("train", BATCH):
        step += 1
        gathered = [None] * session.world
        dist.all_gather_object(gathered, batch["row"].tolist())
        rows.extend(r for part in gathered for r in part)
        if step == config["crash_at"]:
            if session.resumed_from is None:
                if session.is_chief:  # what this attempt drew, for the test to compare
                    storage.write_bytes(config["seen_uri"], json.dumps(gathered).encode())
                raise RuntimeError("simulated worker crash")
            if session.is_chief:
                storage.write_bytes(config["redone_uri"], json.dumps(gathered).encode())
        if step % 2 == 0 or step == config["steps"]:
            session.report(step, {}, {"step": step, "rows": torch.tensor(rows)})
        if step >= config["steps"]:
            break


@pytest.fixture(scope="module")
def class_sorted_files(stack, tmp_path_factory):
    """One Parquet file per class, rows in order: the worst case for a reader that does not shuffle."""
    root = tmp_path_factory.mktemp("sorted")
    uris = []
    for c in range(CLASSES):
        rows = list(range(c * PER_CLASS, (c + 1) * PER_CLASS))
        uri = str(root / f"class{c}.parquet")
        storage.write_parquet(uri, pa.table({"row": rows, "label": [c] * PER_CLASS}), rel_to=str(root))
        uris.append(uri)
    return uris


def _train(uris, out, seed: int, steps: int = 12, crash_at: int = -1, max_failures: int = 0) -> list[int]:
    cfg = ToyConfig(output_uri=str(out), seed=seed, steps=steps, max_failures=max_failures)
    job = StageRun("toy", cfg, [], "test-ray-train")
    sides = {
        "seen_uri": str(out.parent / f"{out.name}-seen.json"),
        "redone_uri": str(out.parent / f"{out.name}-redone.json"),
    }
    state = ray_train.fit(
        job,
        toy_loop,
        {"steps": steps, "crash_at": crash_at, **sides},
        {"train": ray_train.read_parquet(uris, ["row", "label"], seed)},
        cfg,
    )
    assert int(state["step"]) == steps
    return state["rows"].tolist()  # the global batches, in order


def test_seeded_shuffled_resumable_order(class_sorted_files, tmp_path):
    # a crash in epoch 2, at step 11 (the last checkpoint at step 10): the resumed run redoes step 11
    rows = _train(class_sorted_files, tmp_path / "a", seed=0, crash_at=11, max_failures=1)
    seen = json.loads((tmp_path / "a-seen.json").read_text())
    redone = json.loads((tmp_path / "a-redone.json").read_text())
    assert seen == redone  # every worker drew the same rows as before the crash
    per_epoch, per_step = CLASSES * PER_CLASS, BATCH * WORKERS
    assert len(rows) == 12 * per_step and sorted(rows[:per_epoch]) == list(range(per_epoch))  # each row once
    for lo in range(0, per_epoch, 2 * per_step):  # every two global batches mix the classes
        assert len({r // PER_CLASS for r in rows[lo : lo + 2 * per_step]}) >= 3, rows[lo : lo + 16]
    assert rows[:per_step] != sorted(rows[:per_step])  # shuffled within files too
    epoch2 = rows[per_epoch : per_epoch + 4 * per_step]
    assert epoch2 != [r for r in rows[:per_epoch] if r in set(epoch2)]  # a new order in the next epoch
    assert rows[10 * per_step : 11 * per_step] == [r for part in seen for r in part]
