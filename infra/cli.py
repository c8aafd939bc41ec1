"""Command-line helpers shared by stage and pipeline entry points.

Every command logs to stderr and to a file (``<local dir>/logs/<command>-<time>.log``). A mistake
a user can fix (a source or model that does not exist, a URI that is not committed, an output that
another config committed, input the stage cannot use) ends in one line naming the problem and the
log file, exit status 1; ``--debug`` prints the traceback as well (the log file always has it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from infra import config as config_lib
from infra import tracking

T = TypeVar("T")
log = logging.getLogger(__name__)

OVERRIDES_HELP = (
    "dotted overrides, parsed as YAML values: e.g. ingest.resolution=64 ingest.max_images=null "
    "run.experiment=my-exp. Unknown keys and wrong types are errors."
)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "your input or config is wrong", not "the program is broken"."""
    from infra.stage import InputError, NotCommittedError, OutputConflictError

    found = (
        config_lib.ConfigError,
        InputError,
        NotCommittedError,
        OutputConflictError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
    )
    # modules not loaded raised none of their errors: a checkpoint that cannot be read, an S3
    # endpoint that does not answer
    checkpoint, botocore = sys.modules.get("models.checkpoint"), sys.modules.get("botocore.exceptions")
    found += (checkpoint.CheckpointError,) if checkpoint is not None else ()
    found += (botocore.EndpointConnectionError, botocore.NoCredentialsError) if botocore is not None else ()
    return found


class RedactingFormatter(logging.Formatter):
    """Lines (tracebacks included) with the credentials of every URI in them redacted."""

    def format(self, record: logging.LogRecord) -> str:
        from infra.storage import redact

        return redact(super().format(record))


_traceback_log = logging.getLogger("taming.traceback")  # the log file only: see run_guarded
_traceback_log.propagate = False
_handlers: list[logging.Handler] = []


def setup_logging(name: str, level: int = logging.INFO) -> Path:
    """Log to stderr and to a new file for this command; returns the file's path."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = tracking.local_dir() / "logs" / f"{name}-{stamp}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    to_file = logging.FileHandler(path)
    to_stderr = logging.StreamHandler(sys.stderr)
    for h in (to_file, to_stderr):
        h.setFormatter(fmt)
    root = logging.getLogger()
    for h in _handlers:  # a second command in one process (tests): replace, do not stack
        root.removeHandler(h)
        h.close()
    _handlers[:] = [to_stderr, to_file]
    root.addHandler(to_stderr)
    root.addHandler(to_file)
    root.setLevel(level)
    _traceback_log.handlers = [to_file]
    from infra.cluster import WORKER_LOG

    WORKER_LOG.handlers = [to_file]  # the Ray workers' lines the console shows, in the file too
    WORKER_LOG.setLevel(logging.INFO)
    from infra.cluster import QUIET_LOGGERS, redact_log_records

    redact_log_records()
    for noisy in ("alembic", *QUIET_LOGGERS):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


def user_error(e: BaseException | None, depth: int = 0) -> BaseException | None:
    """``e`` or the user error it wraps: Ray wraps what tasks raise (``.cause``) and Ray Train what
    its workers raise (``.worker_failures``)."""
    if e is None or depth > 8:
        return None
    if isinstance(e, user_errors()):
        return e
    inner = [getattr(e, "cause", None), e.__cause__, *getattr(e, "worker_failures", {}).values()]
    for x in inner:
        if isinstance(x, BaseException) and (found := user_error(x, depth + 1)) is not None:
            return found
    return None


def run_guarded(fn: Callable[[], T], log_file: Path, debug: bool) -> T:
    """``fn()``; a user error becomes one line on stderr and exit status 1 (see the module docstring)."""
    try:
        return fn()
    except Exception as e:
        _traceback_log.error("failed", exc_info=True)
        found = user_error(e)
        if found is None or debug:
            raise
        from infra.storage import redact

        message = str(found).strip().splitlines()[0] if str(found).strip() else type(found).__name__
        print(f"error: {redact(message)} (traceback in {log_file}; --debug prints it)", file=sys.stderr)
        sys.exit(1)


def _config_help(cls: type, prefix: str, defaults: Any = None, role: str | None = None) -> str:
    """Per key (``recipe.lr = None``) its default and, indented below, its description (the field's
    comment in the config dataclass); nested sections expanded with their defaults; keys of an
    execution field, or inside one, are marked ``[execution]``."""
    lines = []
    about = config_lib.field_comments(cls)
    for f in dataclasses.fields(cls):
        if defaults is not None:
            value = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        own = f.metadata.get(config_lib.ROLE) or role
        if dataclasses.is_dataclass(value):
            lines.append(_config_help(type(value), f"{prefix}{f.name}.", value, own))
            continue
        default = "(required)" if value is dataclasses.MISSING else f"= {value!r}"
        lines.append(f"  {prefix}{f.name} {default}" + ("   [execution]" if own == "execution" else ""))
        if f.name in about:
            lines += textwrap.wrap(about[f.name], 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def stage_cli(
    stage: str, cls: type[T], doc: str | None, argv: list[str] | None = None
) -> tuple[T, str, tuple[bool, bool]]:
    """Parse ``--config FILE key=value ...`` for one stage: (config, experiment, (debug, json)).

    The file may be a pipeline YAML (the stage's section ``<stage>:`` is used, plus ``run.experiment``)
    or a file holding the stage's keys alone. Overrides may be written with or without the
    ``<stage>.`` prefix.
    """
    keys = _config_help(cls, "")
    p = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"{stage} keys (key=value on the command line, with or without `{stage}.`; in a pipeline "
            f"YAML under `{stage}:`; [execution]: not part of the output's identity):\n{keys}"
        ),
    )
    p.add_argument("--config", type=Path, help="YAML file (a pipeline config or this stage's section)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error, not one line")
    p.add_argument("--json", action="store_true", help="end with the summary as JSON (for scripts)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value (dotted for nested keys, parsed as YAML values), e.g. output_uri=/abs/out "
        "resources.workers=2 run.experiment=my-exp; unknown keys and wrong types are errors",
    )
    args = p.parse_intermixed_args(argv)
    raw: dict[str, Any] = {}
    try:
        raw = config_lib.read_yaml(args.config) if args.config else {}
    except config_lib.ConfigError as e:
        p.error(str(e))
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
    return cfg, experiment, (args.debug, args.json)


# what a figure measures, where its name does not say it
FIGURE_NOTES = {
    "images_per_s": "the whole stage, start-up included",
    "tokens_per_s": "the whole stage, start-up included",
    "actor_images_per_s": "one actor while it works, start-up and writes excluded",
}


def result_lines(result: Any, log_file: Path) -> list[str]:
    """A stage's end on the console: what it did and where, its figures (explained), its pictures
    in MLflow, the log file."""
    s = result.summary()
    status = "reused (committed earlier with this config)" if s["cached"] else "ran"
    lines = [f"{s['stage']} {status} -> {s['output_uri']}"]
    skip = {"stage", "output_uri", "cached", "registered_model"}
    shown = []
    for k, v in s.items():
        if k in skip or not isinstance(v, int | float) or isinstance(v, bool):
            continue
        text = f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v:,}"
        shown.append(text + (f" ({FIGURE_NOTES[k]})" if k in FIGURE_NOTES else ""))
    if shown:
        lines.append("  " + ", ".join(shown))
    if s.get("registered_model"):
        lines.append(f"  registered: {s['registered_model']}")
    m = getattr(result, "manifest", None)
    if m is not None and (m.dataset or {}).get("kind", "").endswith("image_shards"):
        lines.append(f"  as PNG files: make export SRC={s['output_uri']}")
    run_id = getattr(m, "mlflow_run_id", None)
    if run_id:
        try:
            pictures = tracking.image_artifacts(run_id)
        except Exception as e:  # the tracking server went away: the rest of the summary stands
            log.debug("no artifact listing: %s", e)
            pictures = []
        lines.append(f"  MLflow run {run_id}" + (":" if pictures else ""))
        lines += [f"    {p}" for p in pictures[:4]]
    lines.append(f"  log: {log_file}")
    from infra.storage import redact

    return [redact(x) for x in lines]  # URIs as printed never carry a credential


def stage_main(stage: str, cls: type[T], doc: str | None, run: Callable[[T, str], Any], argv=None) -> Any:
    """The body of every stage's ``main``: parse the command line, run, print what it did and where
    (``--json``: the summary as JSON)."""
    cfg, experiment, (debug, as_json) = stage_cli(stage, cls, doc, argv)
    log_file = setup_logging(stage)
    result = run_guarded(lambda: run(cfg, experiment), log_file, debug)
    if as_json:
        print(json.dumps(result.summary(), indent=2))
    else:
        print("\n".join(result_lines(result, log_file)))
    return result
