"""The whole pipeline: the stages that exist, chained under one parent MLflow run.

Each stage's output URI is the next stage's input URI; stage outputs left empty in the config
default to ``<run.root_uri>/<stage output name>``. Work already committed with the same config is
reused, and a run that was interrupted resumes where it stopped.

    python pipelines/full.py --config pipelines/configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python pipelines/full.py --config pipelines/configs/demo.yaml \\
        run.root_uri=s3://bucket/runs/demo

Under ``ray job submit`` give ``run.root_uri`` as an absolute path or an ``s3://`` URI: a relative
path would resolve inside the job's temporary working directory.

``--explain`` prints which stages would run and which are committed, and why (not committed yet,
config changed and which keys, an input that changed or is made again first), and each stage's plan
(what it will read and how much work: built from the manifests and model headers, as the stage
itself builds it before any work), and runs nothing.
A stage whose committed output no longer matches its config stops the run (nothing is
overwritten) unless ``run.replace_changed=true``: then its old manifest is set aside under
``<output>/_replaced/`` and the stage runs again. A stage that fails for another reason than its
input or config (a node lost, a worker killed) runs again ``run.stage_retries`` times and resumes
from the shards and checkpoints it had finished. At the end a table (per stage: cached or ran,
seconds, output, headline figures) is printed and logged to the parent MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra import config as config_lib  # noqa: E402
from infra import stage, storage, tracking  # noqa: E402
from infra.cli import OVERRIDES_HELP, run_guarded, setup_logging, user_error  # noqa: E402
from infra.cluster import ray_logs_dir  # noqa: E402
from stages import (  # noqa: E402
    depth,
    edges,
    evaluate,
    ingest,
    lowres,
    promote,
    sample,
    segmentation,
    tokenize_images,
    train_gpt,
    train_vqgan,
)

log = logging.getLogger("pipelines.full")


@dataclass(frozen=True)
class RunConfig:
    name: str = "pipeline"  # the parent MLflow run's name
    experiment: str = tracking.DEFAULT_EXPERIMENT
    root_uri: str = ".local/runs/default"  # stage outputs default to folders below it
    replace_changed: bool = False  # a committed output whose config/inputs changed: run again (else stop)
    stage_retries: int = 1  # reruns of a stage that failed for a reason other than its config or input


@dataclass(frozen=True)
class FullConfig:
    ingest: ingest.IngestConfig
    run: RunConfig = field(default_factory=RunConfig)
    # per-image condition columns, each stage adding one to the previous one's image shards
    depth: depth.DepthConfig | None = None  # MiDaS depth maps (D-RIN conditioning)
    segmentation: segmentation.SegmentationConfig | None = None  # DeepLab label maps (S-FLCKR)
    edges: edges.EdgesConfig | None = None  # Canny edge maps (structure-to-image)
    lowres: lowres.LowresConfig | None = None  # low-resolution copies (stochastic super-resolution)
    train_vqgan: train_vqgan.TrainVQGANConfig | None = None  # trains (and registers) the tokenizer
    # the condition's own tokenizer ("first learn another VQGAN"): train_vqgan with input=<column>;
    # tokenize_images then writes <column>_codes with it, the spatial prefix of train_gpt
    condition_vqgan: train_vqgan.TrainVQGANConfig | None = None
    tokenize_images: tokenize_images.TokenizeConfig | None = None  # runs when a tokenizer is configured
    train_gpt: train_gpt.TrainGPTConfig | None = None  # the transformer on the code shards
    sample: sample.SampleConfig | None = None  # a generated dataset from the transformer
    evaluate: evaluate.EvaluateConfig | None = None  # how good that dataset is, against the real images
    promote: promote.PromoteConfig | None = None  # @champion moves to the generator only when it beats it


ANNOTATORS = ("depth", "segmentation", "edges", "lowres")  # in the order they chain


def resolve(cfg: FullConfig) -> FullConfig:
    """Fill the stage URIs left empty from ``run.root_uri`` (absolute, so workers agree on them)."""
    root = storage.normalize(cfg.run.root_uri)
    ing = cfg.ingest
    _ = ing.source  # a folder-style source needs its URI: fail before the first stage
    if not ing.output_uri:
        ing = dataclasses.replace(ing, output_uri=storage.join(root, "images"))
    images = ing.output_uri  # each annotating stage reads the previous one's output, adds a column
    annotated = {}
    for name in ANNOTATORS:
        a = getattr(cfg, name)
        if a is not None:
            a = dataclasses.replace(
                a, images_uri=a.images_uri or images, output_uri=a.output_uri or storage.join(root, name)
            )
            images = a.output_uri
        annotated[name] = a
    tok = cfg.tokenize_images
    cvq = cfg.condition_vqgan
    if cvq is not None:
        if cvq.input == "image":
            raise config_lib.ConfigError(
                f"condition_vqgan.input: name the condition column it learns ({', '.join(ANNOTATORS)})"
            )
        if annotated[cvq.input] is None and not cvq.images_uri:
            raise config_lib.ConfigError(
                f"condition_vqgan.input={cvq.input}: no {cvq.input} stage in this pipeline (add a "
                f"`{cvq.input}:` section, or set condition_vqgan.images_uri to shards with that column)"
            )
        cvq = dataclasses.replace(
            cvq,
            images_uri=cvq.images_uri or images,
            output_uri=cvq.output_uri or storage.join(root, f"{cvq.input}-vqgan"),
        )
    trn = cfg.train_vqgan
    if trn is not None:
        trn = dataclasses.replace(
            trn,
            images_uri=trn.images_uri or ing.output_uri,
            output_uri=trn.output_uri or storage.join(root, "vqgan"),
        )
    if tok is not None:
        # tokenizer_uri "" = the model this pipeline trains
        tok = dataclasses.replace(
            tok,
            images_uri=tok.images_uri or images,
            output_uri=tok.output_uri or storage.join(root, "codes"),
            tokenizer_uri=tok.tokenizer_uri or (trn.output_uri if trn is not None else ""),
        )
        if cvq is not None and not getattr(tok, f"{cvq.input}_tokenizer_uri"):  # "" = the one trained here
            tok = dataclasses.replace(tok, **{f"{cvq.input}_tokenizer_uri": cvq.output_uri})
    gpt = cfg.train_gpt
    if gpt is not None:
        gpt = dataclasses.replace(
            gpt,
            codes_uri=gpt.codes_uri or (tok.output_uri if tok is not None else ""),
            output_uri=gpt.output_uri or storage.join(root, "gpt"),
        )
    if tok is not None and not tok.tokenizer_uri:  # fail before the first stage runs
        raise config_lib.ConfigError("tokenize_images.tokenizer_uri: not set, and no train_vqgan stage")
    if gpt is not None and gpt.condition in train_gpt.SPATIAL and tok is not None:
        if not getattr(tok, f"{gpt.condition}_tokenizer_uri"):
            raise config_lib.ConfigError(
                f"train_gpt.condition={gpt.condition} needs {train_gpt.SPATIAL[gpt.condition]}: add a "
                f"condition_vqgan section with input={gpt.condition}, or set "
                f"tokenize_images.{gpt.condition}_tokenizer_uri"
            )
    smp = cfg.sample
    if smp is not None and not (smp.model_uri or gpt is not None):
        raise config_lib.ConfigError("sample.model_uri: not set, and no train_gpt stage")
    if smp is not None:
        # model_uri "" = the generator this pipeline trains; spatial conditions default to its codes
        spatial = gpt is not None and gpt.condition in train_gpt.SPATIAL
        smp = dataclasses.replace(
            smp,
            model_uri=smp.model_uri or (gpt.output_uri if gpt is not None else ""),
            conditions_uri=smp.conditions_uri or (gpt.codes_uri if spatial else None),
            # the generator's own codes: condition on the images it did not train on
            conditions_split=smp.conditions_split
            or ("held-out" if spatial and not smp.conditions_uri else None),
            output_uri=smp.output_uri or storage.join(root, "samples"),
        )
    ev = cfg.evaluate
    if ev is not None:
        # generated_uri "" = this pipeline's samples; reference_uri "" = its ingested images
        ev = dataclasses.replace(
            ev,
            generated_uri=ev.generated_uri or (smp.output_uri if smp is not None else ""),
            reference_uri=ev.reference_uri or ing.output_uri,
            output_uri=ev.output_uri or storage.join(root, "evaluation"),
        )
        if not ev.generated_uri and not ev.tokenizer_uri:
            raise config_lib.ConfigError("evaluate.generated_uri: not set, and no sample stage")
    pro = cfg.promote
    if pro is not None:  # evaluation_uri "" = this pipeline's evaluation
        if not pro.evaluation_uri and (ev is None or not ev.generated_uri):
            raise config_lib.ConfigError("promote.evaluation_uri: not set, and no evaluate stage of samples")
        pro = dataclasses.replace(
            pro,
            evaluation_uri=pro.evaluation_uri or ev.output_uri,
            output_uri=pro.output_uri or storage.join(root, "promote"),
        )
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, root_uri=root),
        train_gpt=gpt,
        sample=smp,
        evaluate=ev,
        promote=pro,
        ingest=ing,
        **annotated,
        train_vqgan=trn,
        condition_vqgan=cvq,
        tokenize_images=tok,
    )


# The stages in the order they chain; each is `module.run(cfg, experiment) -> StageResult`.
STAGES = (
    ("ingest", ingest),
    ("depth", depth),
    ("segmentation", segmentation),
    ("edges", edges),
    ("lowres", lowres),
    ("train_vqgan", train_vqgan),
    ("condition_vqgan", train_vqgan),
    ("tokenize_images", tokenize_images),
    ("train_gpt", train_gpt),
    ("sample", sample),
    ("evaluate", evaluate),
    ("promote", promote),
)


def _configured(cfg: FullConfig):
    """(name, module, stage config) of the configured stages, in order."""
    return [(n, m, getattr(cfg, n)) for n, m in STAGES if getattr(cfg, n) is not None]


def _plan_line(name: str, module: Any, scfg: Any, remade: list[str]) -> str:
    """The stage's plan summary, or why it cannot be made yet (an input made first) or would fail."""
    made_first = [r for r in remade if r in stage_inputs(scfg)]
    if made_first:
        return f"planned once {made_first[0]} is made"
    try:
        return module.plan(scfg).summary(scfg)
    except stage.NotCommittedError as e:
        return f"planned once its input is committed ({str(e).split(' holds', 1)[0]})"
    except Exception as e:  # noqa: BLE001 - shown, as the run would show it
        if user_error(e) is None:
            raise
        return f"would fail: {str(e).splitlines()[0]}"


def stage_inputs(scfg: Any) -> list[str]:
    """The committed outputs a stage config reads (its input fields), normalised."""
    return [v for v in stage.input_uris(scfg) if not v.startswith("models:/")]


def explain(cfg: FullConfig) -> list[dict[str, Any]]:
    """Per configured stage: ``action`` (``cached``, ``run``, ``rerun`` or ``stop``) and ``why``,
    from the committed manifests alone, and ``plan``: what the stage will read and how much work
    (nothing is loaded or run). A stage runs when its output is not committed; one committed under
    another config, or from inputs that changed or are made again first, reruns with
    ``run.replace_changed`` and stops the run without it."""
    cfg = resolve(cfg)
    plan, remade = [], []
    for name, module, scfg in _configured(cfg):
        out = scfg.output_uri
        if not stage.is_committed(out):
            attempts = storage.list_dirs(storage.join(out, stage.ATTEMPTS_DIR))
            why = ["not committed"] + (
                ["an interrupted attempt's finished work is reused"] if attempts else []
            )
            action = "run"
        else:
            why = stage.changes(stage.read_manifest(out), module.STAGE, scfg, remade)
            action = "cached" if not why else ("rerun" if cfg.run.replace_changed else "stop")
            if not why:
                why = ["committed with this config and these inputs"]
        summary = _plan_line(name, module, scfg, remade)
        if action != "cached":
            remade.append(storage.normalize(out))
        plan.append({"stage": name, "action": action, "output_uri": out, "why": why, "plan": summary})
    return plan


def format_plan(plan: list[dict[str, Any]]) -> str:
    width = max((len(p["stage"]) for p in plan), default=5)
    pad = " " * (width + 10)
    lines = [
        f"{p['stage']:<{width}}  {p['action']:<6}  {p['output_uri']}\n{pad}"
        + "; ".join(p["why"])
        + f"\n{pad}{p['plan']}"
        for p in plan
    ]
    stops = [p["stage"] for p in plan if p["action"] == "stop"]
    if stops:
        lines.append(
            f"the run would stop at {stops[0]}: its committed output no longer matches the config "
            "(set run.replace_changed=true to make it again, or choose another output URI)"
        )
    return "\n".join(lines)


def _headline(module: Any, summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in getattr(module, "HEADLINE", ()) if summary.get(k) is not None}


def _figures_text(figures: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The end-of-run table: stage, cached or ran, seconds, output, headline figures."""
    header = ("stage", "status", "seconds", "output", "figures")
    table = [
        (
            r["stage"],
            r["status"],
            f"{r['seconds']:.0f}",
            r["output_uri"],
            _figures_text(r["figures"]),
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *table)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in table)])


def _run_stage(name: str, module: Any, scfg: Any, cfg: FullConfig) -> stage.StageResult:
    if cfg.run.replace_changed and stage.is_committed(scfg.output_uri):
        why = stage.changes(stage.read_manifest(scfg.output_uri), module.STAGE, scfg)
        if why:
            log.warning("%s: %s; making it again (run.replace_changed)", name, "; ".join(why))
            stage.uncommit(scfg.output_uri)
    attempt = 0
    while True:
        try:
            return module.run(scfg, cfg.run.experiment)
        except Exception as e:
            if user_error(e) is not None or attempt == cfg.run.stage_retries:
                raise
            attempt += 1
            log.warning(
                "%s failed (%s: %s); running it again (%d of %d), from the work it had finished",
                name,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
                attempt,
                cfg.run.stage_retries,
            )


def run(cfg: FullConfig) -> dict:
    cfg = resolve(cfg)
    summary: dict = {"root_uri": cfg.run.root_uri}
    rows: list[dict[str, Any]] = []
    with tracking.pipeline_run(cfg.run.name, cfg, cfg.run.experiment) as run_id:
        summary["mlflow_run_id"] = run_id
        for name, module, scfg in _configured(cfg):
            log.info("== %s -> %s", name, scfg.output_uri)
            t0 = time.perf_counter()
            res = _run_stage(name, module, scfg, cfg)
            seconds = time.perf_counter() - t0
            tracking.set_tags({f"{name}.cached": res.cached, f"{name}.output_uri": res.output_uri})
            summary[name] = res.summary()
            reused = res.counts.get("reused_shards", 0)
            status = "cached" if res.cached else (f"ran ({reused} shards reused)" if reused else "ran")
            row = {
                "stage": name,
                "status": status,
                "seconds": seconds,
                "output_uri": res.output_uri,
                "figures": _headline(module, summary[name]),
            }
            rows.append(row)
            if name == "sample":
                summary["sample_grid_run"] = res.manifest.mlflow_run_id
                if res.manifest.mlflow_run_id:
                    grid = tracking.artifact_location(res.manifest.mlflow_run_id, "samples/grid.png")
                    summary["sample_grid"] = storage.redact(grid)
            if name == "evaluate":
                summary["metrics_uri"] = res.manifest.data_uris()[0]
            if name == "promote":
                summary["decision"] = res.manifest.extra["decision"]
            log.info("== %s %s in %.0f s: %s", name, status, seconds, _figures_text(row["figures"]))
        table = summary_table(rows)
        tracking.log_dict({"stages": rows}, "pipeline_summary.json")
        tracking.log_text(table + "\n", "pipeline_summary.txt")
        metrics = {f"{r['stage']}/pipeline_seconds": r["seconds"] for r in rows}
        for r in rows:  # every stage's headline figures on the parent run, beside its seconds
            metrics.update(
                {f"{r['stage']}/{k}": float(v) for k, v in r["figures"].items() if isinstance(v, int | float)}
            )
        tracking.log_metrics(metrics)
    summary["stages"] = rows
    summary["table"] = table
    summary["tracking_uri"] = storage.redact(tracking.tracking_uri())
    return summary


CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def help_epilog() -> str:
    """The stages in the order they chain (each one's first docstring line) and the shipped configs
    (each one's first comment line): the end of ``--help``."""
    import textwrap

    def sentence(paragraph: str) -> str:
        text = " ".join(paragraph.split())
        return textwrap.shorten(text.split(". ")[0].rstrip("."), 100, placeholder=" ...")

    lines = [
        "stages, in the order they chain (a YAML section each; `python -m stages.<name> --help`: its keys):"
    ]
    for name, module in STAGES:
        about = sentence((module.__doc__ or "").strip().split("\n\n")[0])
        if name == "condition_vqgan":
            about = "train_vqgan for the condition maps: their own tokenizer"
        lines.append(f"  {name:<16} {about}")
    lines.append("\nshipped configs (pipelines/configs/):")
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        head = []
        for x in path.read_text().splitlines():
            if not x.startswith("#") or not x[1:].strip():
                break
            head.append(x[1:])
        lines.append(f"  {path.name:<20} {sentence(' '.join(head))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="pipelines/full.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=help_epilog(),
    )
    p.add_argument("--config", type=Path, required=True, help="pipeline YAML (see pipelines/configs/)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error, not one line")
    p.add_argument(
        "--explain",
        action="store_true",
        help="print which stages would run or are committed, and why; run nothing",
    )
    p.add_argument("--json", action="store_true", help="also print the whole summary as JSON")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    args = p.parse_intermixed_args(argv)
    try:
        cfg = resolve(config_lib.load(FullConfig, args.config, args.overrides))  # all checks first
    except config_lib.ConfigError as e:
        p.error(str(e))
    log_file = setup_logging("pipeline")
    if args.explain:
        plan = run_guarded(lambda: explain(cfg), log_file, args.debug)
        print(format_plan(plan))
        if log_file.exists() and log_file.stat().st_size == 0:  # nothing was logged: no empty file left
            log_file.unlink()
        return {"plan": plan}
    summary = run_guarded(lambda: run(cfg), log_file, args.debug)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2))
    print(f"\n{summary['table']}\n\n{where_to_look(summary, log_file)}")
    return summary


def where_to_look(summary: dict[str, Any], log_file: Path) -> str:
    """The end of a run's console: the MLflow UI, the sample grid, the metrics, the logs."""
    uri = summary["tracking_uri"]
    ui = f".venv/bin/mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
    lines = [f"MLflow:   {ui}   (parent run {summary['mlflow_run_id']})"]
    if "sample" in summary:
        out = summary["sample"]["output_uri"]
        lines.append(f"samples:  {out}   (as PNG files: make export SRC={out})")
        if summary.get("sample_grid"):
            lines.append(f"grid:     {summary['sample_grid']}")
    if "evaluate" in summary:
        lines.append(f"metrics:  {summary['metrics_uri']}")
    if "decision" in summary:
        d = summary["decision"]
        model = f"models:/{d['model']}/{d['candidate_version']}"
        verdict = "is @champion" if d["promoted"] else f"stays a candidate ({'; '.join(d['failed'])[:200]})"
        lines.append(f"registry: {model} {verdict}")
    lines.append(f"log:      {log_file}")
    if (ray_logs := ray_logs_dir()) is not None:
        lines.append(f"Ray logs: {ray_logs}   (every worker's full output, on the head node)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
