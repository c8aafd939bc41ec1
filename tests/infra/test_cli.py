"""What ``--help`` tells a user: every key of every stage with its default and a description, the
stage's own examples, and for the pipeline the stages and the shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines import full


@pytest.mark.parametrize("name", sorted({n for n, _ in full.STAGES if n != "condition_vqgan"}))
def test_every_key_of_every_stage_is_described(name, capsys):
    module = dict(full.STAGES)[name]
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m stages.{name}" in out
    keys = out.split(f"{name} keys (", 1)[1].splitlines()[1:]
    entries: dict[str, list[str]] = {}
    for line in keys:
        if re.match(r"^  \S", line):
            entries[line.split()[0]] = []
        elif line.startswith("      ") and entries:
            entries[list(entries)[-1]].append(line.strip())
    assert len(entries) >= 3
    undescribed = [k for k, about in entries.items() if not about]
    assert not undescribed, f"{name}: keys without a description: {undescribed}"
    # the examples in the help are this stage's (`python -m stages.<name>` or its make target)
    assert "python -m stages." not in out.replace(f"python -m stages.{name}", "")


def test_the_pipeline_help_lists_the_stages_and_the_configs():
    text = full.help_epilog()
    for name, _ in full.STAGES:
        assert f"\n  {name} " in text
    for path in full.CONFIGS_DIR.glob("*.yaml"):
        line = next(x for x in text.splitlines() if x.strip().startswith(path.name))
        assert len(line.split(path.name, 1)[1].strip()) > 20  # its first comment sentence


@pytest.mark.slow  # creates an embedded MLflow database (~15 s)
def test_a_stage_ends_with_what_it_did_and_where(tmp_path):
    """The lines a stage's command ends with: output, figures with what they measure, the export
    command for images, the pictures its MLflow run logged, the log file."""
    import numpy as np

    from infra import cli, stage, tracking
    from infra.image_shards import ImageShards

    d = ImageShards(channels=1, size=(8, 8), label_names=None)
    out = stage.StageOutput(str(tmp_path / "samples"), "sample", "cli-test")
    with tracking.stage_run("sample", {}, [], str(tmp_path / "samples"), "test-cli") as run_id:
        tracking.log_image(np.zeros((8, 8), np.uint8), "samples/grid.png")
    m, _ = out.commit(
        config={},
        config_hash="h",
        inputs=[],
        markers=[],
        counts={"samples": 0},
        figures={"images_per_s": 7.49, "actor_images_per_s": 59.7},
        mlflow_run_id=run_id,
        dataset=d.to_json(),
    )
    lines = cli.result_lines(stage.StageResult.of(m, False), tmp_path / "x.log")
    text = "\n".join(lines)
    assert lines[0] == f"sample ran -> {m.output_uri}"
    assert "images_per_s 7.49 (the whole stage, start-up included)" in text
    assert "actor_images_per_s 59.7 (one actor while it works" in text
    assert f"make export SRC={m.output_uri}" in text
    grid = next(x.strip() for x in lines if x.strip().endswith("samples/grid.png"))
    # a local artifact store: the file itself; a tracking server's: its URI (mlflow-artifacts:/...)
    assert Path(grid).is_file() or grid.startswith(("mlflow-artifacts:", "s3://", "http")), grid
    assert lines[-1] == f"  log: {tmp_path / 'x.log'}"
