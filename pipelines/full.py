"""The whole pipeline: the stages that exist, chained under one parent MLflow run.

Each stage's output URI is the next stage's input URI; stage outputs left empty in the config
default to ``<run.root_uri>/<stage output name>``. Work already committed with the same config is
reused, and a run that was interrupted resumes where it stopped.

    python pipelines/full.py --config pipelines/configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python pipelines/full.py --config pipelines/configs/demo.yaml \\
        run.root_uri=s3://bucket/runs/demo

Under ``ray job submit`` give ``run.root_uri`` as an absolute path or an ``s3://`` URI: a relative
path would resolve inside the job's temporary working directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (also under `ray job submit`): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra import config as config_lib  # noqa: E402
from infra import storage, tracking  # noqa: E402
from infra.cli import OVERRIDES_HELP, run_guarded, setup_logging  # noqa: E402
from stages import depth, evaluate, ingest, sample, segmentation, tokenize_images, train_gpt, train_vqgan  # noqa: E402

log = logging.getLogger("pipelines.full")


@dataclass(frozen=True)
class RunConfig:
    name: str = "pipeline"  # the parent MLflow run's name
    experiment: str = tracking.DEFAULT_EXPERIMENT
    root_uri: str = ".local/runs/default"  # stage outputs default to folders below it


@dataclass(frozen=True)
class FullConfig:
    ingest: ingest.IngestConfig
    run: RunConfig = field(default_factory=RunConfig)
    depth: depth.DepthConfig | None = None  # MiDaS depth maps (D-RIN conditioning), when present
    segmentation: segmentation.SegmentationConfig | None = None  # DeepLab label maps, when present
    train_vqgan: train_vqgan.TrainVQGANConfig | None = None  # trains (and registers) the tokenizer
    tokenize_images: tokenize_images.TokenizeConfig | None = None  # runs when a tokenizer is configured
    train_gpt: train_gpt.TrainGPTConfig | None = None  # the transformer on the code shards
    sample: sample.SampleConfig | None = None  # a generated dataset from the transformer
    evaluate: evaluate.EvaluateConfig | None = None  # how good that dataset is, against the real images


def resolve(cfg: FullConfig) -> FullConfig:
    """Fill the stage URIs left empty from ``run.root_uri`` (absolute, so workers agree on them)."""
    root = storage.normalize(cfg.run.root_uri)
    ing = cfg.ingest
    if not ing.output_uri:
        ing = dataclasses.replace(ing, output_uri=storage.join(root, "images"))
    images = ing.output_uri  # each stage reads the previous one's output: images (+ depth) (+ segmentation)
    dep, seg, tok = cfg.depth, cfg.segmentation, cfg.tokenize_images
    if dep is not None:
        dep = dataclasses.replace(
            dep, images_uri=dep.images_uri or images, output_uri=dep.output_uri or storage.join(root, "depth")
        )
        images = dep.output_uri
    if seg is not None:
        seg = dataclasses.replace(
            seg,
            images_uri=seg.images_uri or images,
            output_uri=seg.output_uri or storage.join(root, "segmentation"),
        )
        images = seg.output_uri
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
    gpt = cfg.train_gpt
    if gpt is not None:
        gpt = dataclasses.replace(
            gpt,
            codes_uri=gpt.codes_uri or (tok.output_uri if tok is not None else ""),
            output_uri=gpt.output_uri or storage.join(root, "gpt"),
        )
    if tok is not None and not tok.tokenizer_uri:  # fail before the first stage runs
        raise config_lib.ConfigError("tokenize_images.tokenizer_uri: not set, and no train_vqgan stage")
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
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, root_uri=root),
        train_gpt=gpt,
        sample=smp,
        evaluate=ev,
        ingest=ing,
        depth=dep,
        train_vqgan=trn,
        segmentation=seg,
        tokenize_images=tok,
    )


# The stages in the order they chain; each is `module.run(cfg, experiment) -> StageResult`.
STAGES = (
    ("ingest", ingest),
    ("depth", depth),
    ("segmentation", segmentation),
    ("train_vqgan", train_vqgan),
    ("tokenize_images", tokenize_images),
    ("train_gpt", train_gpt),
    ("sample", sample),
    ("evaluate", evaluate),
)


def run(cfg: FullConfig) -> dict:
    cfg = resolve(cfg)
    summary: dict = {"root_uri": cfg.run.root_uri}
    with tracking.pipeline_run(cfg.run.name, cfg, cfg.run.experiment) as run_id:
        summary["mlflow_run_id"] = run_id
        for name, module in STAGES:
            scfg = getattr(cfg, name)
            if scfg is None:
                continue
            res = module.run(scfg, cfg.run.experiment)
            tracking.set_tags({f"{name}.cached": res.cached, f"{name}.output_uri": res.output_uri})
            summary[name] = res.summary()
    summary["tracking_uri"] = tracking.tracking_uri()
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="pipelines/full.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, required=True, help="pipeline YAML (see pipelines/configs/)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error, not one line")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    args = p.parse_args(argv)
    try:
        cfg = resolve(config_lib.load(FullConfig, args.config, args.overrides))  # all checks first
    except config_lib.ConfigError as e:
        p.error(str(e))
    log_file = setup_logging("pipeline")
    summary = run_guarded(lambda: run(cfg), log_file, args.debug)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
