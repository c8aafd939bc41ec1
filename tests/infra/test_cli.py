"""What ``--help`` tells a user: every key of every stage with its default and a description, the
stage's own examples, and for the pipeline the stages and the shipped configs."""

from __future__ import annotations

import re

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
