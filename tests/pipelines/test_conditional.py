"""A conditional chain in one job, through the real services: images -> edges -> an image VQGAN and
an edges VQGAN -> codes with edges_codes -> a GPT with the edges prefix -> samples from the held-out
split's conditions -> evaluation with the edge-fidelity figures and the diversity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from infra import code_shards, image_shards, stage
from pipelines import full
from tests import images


def _shapes(root, n: int = 24) -> None:
    """Light shapes on dark ground (their outlines are the edges), two classes."""
    rng = np.random.default_rng(0)
    files = {}
    for i in range(n):
        im = Image.new("L", (16, 16), 0)
        x0, y0 = rng.integers(1, 6, 2)
        x1, y1 = rng.integers(10, 15, 2)
        draw = ImageDraw.Draw(im)
        (draw.ellipse if i % 2 else draw.rectangle)(
            (int(x0), int(y0), int(x1), int(y1)), fill=int(rng.integers(120, 255))
        )
        files[f"{'ab'[i % 2]}/{i:03d}.png"] = images.encode(im, "PNG")
    images.write_tree(root, files)


VQ = {
    "preset": "f4-small",
    "codebook_size": 32,
    "steps": 2,
    "batch_size": 4,
    "recipe": {"warmup_steps": 1},
    "checkpoint_every": 2,
    "log_every": 1,
    "image_every": 2,
    "val_images": 4,
    "resources": {"workers": 1},
}


def _console_tells_the_story(capfd) -> None:
    """The console, captured as a file would be: no colour codes, none of the Ray lines no user can
    act on that reach Python (the raylet's worker-count warning, Ray Data's actor-count one),
    the workers' stage lines there; the run's log file holds them too."""
    import re
    import time

    time.sleep(2)  # the workers' last lines reach the driver
    out, err = capfd.readouterr()
    text = out + err
    assert "\x1b[" not in text
    # the driver's own core worker (C++, straight to stderr, no filter reaches it) would log this
    # per Ray Data actor pool restarted from the object store: infra.pool's pools are not restarted
    assert "constructor arguments in the object store" not in text
    assert "PYTHON worker processes have been started" not in text, [
        x for x in text.splitlines() if "PYTHON" in x
    ]
    assert "minimum number of concurrent actors" not in text
    # nor Python's warnings from the libraries (torch's TorchScript deprecation, ...)
    assert not re.search(r"\w+Warning: ", text), [x for x in text.splitlines() if "Warning: " in x]
    assert re.search(r"train_gpt: step 4/4 \(100%", text)  # a Ray Train worker's line, with progress
    log_file = Path(re.search(r"^log: +(\S+)$", out, re.M).group(1))
    assert "train_gpt: step 4/4" in log_file.read_text()  # the workers' lines in the log file too


def test_edges_to_image_in_one_job(stack, tmp_path, capfd):
    _shapes(tmp_path / "src")
    cfg = {
        "run": {"name": "e2i", "experiment": "test-conditional", "root_uri": str(tmp_path / "run")},
        "ingest": {
            "source_uri": str(tmp_path / "src"),
            "resolution": 16,
            "channels": 1,
            "val_fraction": 0.25,
        },
        "edges": {},
        "train_vqgan": VQ,
        "condition_vqgan": {**VQ, "input": "edges"},
        "tokenize_images": {"resources": {"workers": 1}},
        "train_gpt": {
            "condition": "edges",
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 32,
            "steps": 4,
            "batch_size": 4,
            "recipe": {"warmup_steps": 1},
            "checkpoint_every": 2,
            "log_every": 2,
            "val_every": 4,
            "sample_every": 4,
            "resources": {"workers": 1},
        },
        "sample": {
            "samples_per_condition": 2,
            "conditions_split": "val",
            "batch_size": 4,
            "resources": {"workers": 1},
        },
        "evaluate": {"reference_split": "val", "max_images": 64, "inception": "off", "classifier": None},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    summary = full.main(["--config", str(tmp_path / "p.yaml")])
    _console_tells_the_story(capfd)
    codes = stage.read_manifest(summary["tokenize_images"]["output_uri"])
    cc = code_shards.describe(codes).conditions["edges_codes"]
    assert cc.grid == (4, 4) and cc.tokenizer_uri == str(tmp_path / "run" / "edges-vqgan")
    samples = stage.read_manifest(summary["sample"]["output_uri"])
    gen = image_shards.describe(samples).generation
    assert (gen.condition, gen.conditions_column, gen.conditions_split) == ("spatial", "edges_codes", "val")
    val_ids = set(
        stage.read_committed_table(summary["ingest"]["output_uri"], ["image_id"], "val")[
            "image_id"
        ].to_pylist()
    )
    t = stage.read_committed_table(samples.output_uri, ["condition_image_id"])
    assert set(t["condition_image_id"].to_pylist()) == val_ids and t.num_rows == 2 * len(val_ids)
    ev = summary["evaluate"]
    metrics = stage.read_manifest(ev["output_uri"])
    import json

    from infra import storage

    report = json.loads(storage.read_bytes(metrics.data_uris()[0]))
    f = report["figures"]
    assert 0 <= f["edges/f1"] <= 1 and 0 <= f["edges/f1_unpaired"] <= 1 and f["diversity"] > 0
    assert report["counts"]["condition_images"] == 2 * len(val_ids)
    assert any(i.name == "conditions" and i.uri == summary["edges"]["output_uri"] for i in metrics.inputs)
    assert [r["stage"] for r in summary["stages"]][:6] == [
        "ingest",
        "edges",
        "train_vqgan",
        "condition_vqgan",
        "tokenize_images",
        "train_gpt",
    ]
