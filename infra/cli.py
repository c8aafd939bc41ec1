"""Command-line helpers shared by stage and pipeline entry points."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from infra import config as config_lib
from infra import tracking

T = TypeVar("T")

OVERRIDES_HELP = (
    "dotted overrides, parsed as YAML values: e.g. ingest.resolution=64 ingest.max_images=null "
    "run.experiment=my-exp. Unknown keys and wrong types are errors."
)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("alembic", "botocore", "urllib3", "s3fs", "fsspec", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config_help(cls: type, prefix: str) -> str:
    lines = []
    for f in dataclasses.fields(cls):
        default = "(required)" if f.default is dataclasses.MISSING else f"= {f.default!r}"
        lines.append(f"  {prefix}{f.name} {default}")
    return "\n".join(lines)


def stage_cli(stage: str, cls: type[T], doc: str | None, argv: list[str] | None = None) -> tuple[T, str]:
    """Parse ``--config FILE key=value ...`` for one stage.

    The file may be a pipeline YAML (the stage's section ``<stage>:`` is used, plus ``run.experiment``)
    or a file holding the stage's keys alone. Overrides may be written with or without the
    ``<stage>.`` prefix.
    """
    p = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys:\n{_config_help(cls, stage + '.')}",
    )
    p.add_argument("--config", type=Path, help="YAML file (a pipeline config or this stage's section)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    args = p.parse_args(argv)
    setup_logging()
    raw: dict[str, Any] = config_lib.read_yaml(args.config) if args.config else {}
    experiment = (raw.get("run") or {}).get("experiment", tracking.DEFAULT_EXPERIMENT)
    if stage in raw or "run" in raw:  # a pipeline file: this stage's section (maybe absent)
        section = raw.get(stage) or {}
    else:  # a file of this stage's keys alone
        section = raw
    stage_overrides, other = [], []
    for o in args.overrides:
        key = o.split("=", 1)[0]
        if key.startswith("run.experiment"):
            experiment = o.split("=", 1)[1]
        elif key.startswith(stage + "."):
            stage_overrides.append(o[len(stage) + 1 :])
        else:
            other.append(o)
    try:
        cfg = config_lib.from_dict(
            cls, config_lib.apply_overrides(section, [*stage_overrides, *other]), prefix=f"{stage}."
        )
    except config_lib.ConfigError as e:
        p.error(str(e))
    return cfg, experiment


def summary(result: Any) -> dict[str, Any]:
    """What a stage's command prints: a result dataclass without its manifest, or for a stage that
    returns ``(manifest, cached)`` the output, whether it was reused, its counts and ``val/*`` figures."""
    if dataclasses.is_dataclass(result):
        return {k: v for k, v in dataclasses.asdict(result).items() if k != "manifest"}
    manifest, cached = result
    val = {k: v for k, v in manifest.extra.items() if k.startswith("val/")}
    return {"output_uri": manifest.output_uri, "cached": cached, **manifest.counts, **val}


def stage_main(stage: str, cls: type[T], doc: str | None, run: Callable[[T, str], Any], argv=None) -> Any:
    """The body of every stage's ``main``: parse the command line, run, print the summary as JSON."""
    cfg, experiment = stage_cli(stage, cls, doc, argv)
    result = run(cfg, experiment)
    print(json.dumps(summary(result), indent=2))
    return result
