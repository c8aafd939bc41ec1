"""Promote: a generator becomes ``@champion`` only when its evaluation beats the champion's.

Input: an ``evaluate`` output of a registered generator's samples (``evaluation_uri``; the
generator is the one the samples' lineage names, and ``models:/<name>@candidate`` must point at
it). The current ``@champion`` of that name is judged on the same evaluation protocol (the same
reference and training images, sample counts, seed, classifier recipe and Inception network):
its own committed evaluation is reused when its protocol matches, else its samples are evaluated
again under the candidate's evaluate config (beside this output, ``<output_uri>-champion-v<N>``).

The decision is MLflow's own ``mlflow.validate_evaluation_results`` with one
``mlflow.models.MetricThreshold`` per gate (``gates``, metric -> :class:`Gate`): ``better_by`` /
``better_by_relative`` against the champion (MLflow's ``min_absolute_change`` /
``min_relative_change``), ``worse_by_at_most`` (a bound the champion's figure sets: MLflow's
``threshold``), ``threshold`` (absolute, also for the first champion). The default gates: FID at
least 1% lower than the champion's, the classification accuracy score at most 0.02 lower, and
two absolute bounds against an overfit generator: at most 5% memorised samples and 10% duplicates.
A gated figure the evaluation lacks (FID with the Inception skipped) refuses the promotion,
saying so: never a silent promotion. A gate set in YAML or by key (``gates.fid.better_by=2``)
replaces that gate's default rules: give every rule it should keep; ``gates.fid=null`` ungates.

On success ``@champion`` moves to the candidate and ``@previous`` to the old champion; with no
champion yet, the first candidate that passes the absolute bounds becomes it. The decision, both
figures and the gates are recorded as version tags (``promote/*``) and in ``decision.json``; a
refusal is a committed decision too (the stage succeeds, the candidate stays where it was), with
the failing metrics named in the log and the tags.

    python -m stages.promote evaluation_uri=.local/runs/demo/evaluation output_uri=.local/runs/demo/promote \\
        gates.fid.better_by=2.0
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from infra import config as config_lib
from infra import image_shards, model_store, stage, tracking
from infra.config import execution_field, input_field, output_field
from infra.devices import Resources
from infra.stage import InputError, InputRef, StageResult, StageRun

log = logging.getLogger(__name__)
STAGE = "promote"
HEADLINE = ("promoted",)
CHAMPION, PREVIOUS = "champion", "previous"


@dataclass(frozen=True)
class Gate:
    """One metric's rule, in MLflow ``MetricThreshold`` terms; unset parts do not apply."""

    better_by: float | None = None  # vs the champion: at least this much better (> 0)
    better_by_relative: float | None = None  # vs the champion: at least this fraction better (0..1]
    worse_by_at_most: float | None = None  # vs the champion: at most this much worse (>= 0)
    threshold: float | None = None  # absolute bound (at least / at most, by the metric's direction)

    def __post_init__(self):
        if self.better_by is not None and self.better_by <= 0:
            raise ValueError("better_by must be > 0 (use worse_by_at_most for a tolerance)")
        if self.better_by_relative is not None and not 0 < self.better_by_relative <= 1:
            raise ValueError("better_by_relative must lie in (0, 1]")
        if self.worse_by_at_most is not None and self.worse_by_at_most < 0:
            raise ValueError("worse_by_at_most must be >= 0")
        if all(v is None for v in dataclasses.astuple(self)):
            raise ValueError(
                "a gate needs at least one of better_by, better_by_relative, worse_by_at_most, threshold"
            )

    def metric_threshold(self, greater_is_better: bool, champion: float | None):
        """This gate as an MLflow ``MetricThreshold`` against ``champion``'s figure (None: no
        champion), or None when nothing applies (a champion-relative gate with no champion)."""
        from mlflow.models import MetricThreshold

        bounds = [self.threshold] if self.threshold is not None else []
        if champion is not None and self.worse_by_at_most is not None:
            tolerance = -self.worse_by_at_most if greater_is_better else self.worse_by_at_most
            bounds.append(champion + tolerance)
        bound = (max if greater_is_better else min)(bounds) if bounds else None
        relative = champion is not None
        args = {
            "threshold": float(bound) if bound is not None else None,
            "min_absolute_change": float(self.better_by) if relative and self.better_by else None,
            "min_relative_change": float(self.better_by_relative)
            if relative and self.better_by_relative
            else None,
        }
        if all(v is None for v in args.values()):
            return None
        return MetricThreshold(greater_is_better=greater_is_better, **args)


@dataclass(frozen=True)
class Gates:
    """The metrics that decide (null: not gated). Defaults: FID at least 1% lower than the
    champion's, the classification accuracy score at most 0.02 lower, and against an overfit
    generator at most 5% memorised and 10% duplicated samples."""

    fid: Gate | None = field(default_factory=lambda: Gate(better_by_relative=0.01))
    kid: Gate | None = None  # e.g. {better_by: 0.001}
    precision: Gate | None = None  # e.g. {worse_by_at_most: 0.02}
    recall: Gate | None = None  # e.g. {worse_by_at_most: 0.02}
    classifier_score: Gate | None = field(default_factory=lambda: Gate(worse_by_at_most=0.02))
    domain_fid: Gate | None = None  # the FID in the real-data classifier's features
    memorized_fraction: Gate | None = field(default_factory=lambda: Gate(threshold=0.05))
    duplicate_fraction: Gate | None = field(default_factory=lambda: Gate(threshold=0.10))

    LOWER_IS_BETTER = frozenset({"fid", "kid", "domain_fid", "memorized_fraction", "duplicate_fraction"})

    def active(self) -> dict[str, Gate]:
        return {f.name: g for f in dataclasses.fields(self) if (g := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class PromoteConfig:
    evaluation_uri: str = input_field()  # the candidate's evaluate output ("" = the pipeline's)
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    candidate_alias: str = "candidate"  # must point at the evaluated version
    gates: Gates = field(default_factory=Gates)
    # execution only: the one Ray task that evaluates the champion's samples again (another protocol)
    resources: Resources = execution_field(default_factory=Resources)

    def __post_init__(self):
        if not self.gates.active():
            raise ValueError("gates: at least one metric must decide")


@dataclass(frozen=True)
class PromotePlan:
    inputs: tuple[InputRef, ...]
    name: str
    candidate: int
    figures: dict[str, float]  # the candidate's
    protocol: str
    champion: int | None  # the champion this decision is against (None: none yet)
    champion_evaluation: stage.Manifest | None  # its committed evaluation (any protocol)
    same_protocol: bool  # that evaluation is comparable as it is (else its samples are evaluated again)
    evaluation_config: dict[str, Any]  # the candidate's evaluate config (to evaluate the champion alike)
    already: bool  # the candidate is the champion already (this decision was made before)

    def summary(self, cfg: PromoteConfig) -> str:
        if self.already:
            return f"{self.name} v{self.candidate} is @{CHAMPION} already: decided before, it stands"
        against = f"champion v{self.champion}" if self.champion else "no champion yet (absolute bounds only)"
        return f"{self.name} v{self.candidate} against {against}; gates {', '.join(cfg.gates.active())}"


def _version(name: str, alias: str) -> int | None:
    try:
        return tracking.model_version(f"models:/{name}@{alias}")[1]
    except FileNotFoundError:
        return None


def _generated_version(ev: stage.Manifest) -> dict[str, Any] | None:
    """The registry version behind the evaluated samples, from their lineage (for an evaluation
    committed before it could tell: samples of a pipeline's registered train_gpt output)."""
    gen = next((i for i in ev.inputs if i.name == "generated"), None)
    if gen is None or not stage.is_committed(gen.uri):
        return None
    described = image_shards.describe(gen.uri)
    if not isinstance(described, image_shards.GeneratedImageShards):
        return None
    found = model_store.generator_version(described.generation)
    return {"name": found[0], "version": found[1]} if found else None


def plan(cfg: PromoteConfig) -> PromotePlan:
    """Check the evaluation and the registry before any work; every problem fails here, naming it."""
    if not cfg.evaluation_uri:
        raise config_lib.ConfigError("promote.evaluation_uri is not set")
    ev = stage.read_manifest(cfg.evaluation_uri)
    if ev.stage != "evaluate":
        raise InputError(f"promote: {cfg.evaluation_uri} holds a {ev.stage} output, not an evaluation")
    reg = ev.extra.get("generator_registry") or _generated_version(ev)
    if not reg:
        raise InputError(
            f"promote: {cfg.evaluation_uri} evaluates samples of an unregistered generator (its samples' "
            "lineage names no registry version): sample from models:/<name>@<alias> or a registered train_gpt"
        )
    name, version = reg["name"], int(reg["version"])
    pointed = _version(name, cfg.candidate_alias)
    if pointed != version:
        raise InputError(
            f"promote: the evaluation is of {name} v{version}, but models:/{name}@{cfg.candidate_alias} is "
            f"{'unset' if pointed is None else f'v{pointed}'}: evaluate the samples of the current candidate"
        )
    champion, already = _version(name, CHAMPION), False
    if champion == version:  # decided before: judge against the champion it faced then
        already = True
        tags = tracking.model_version_tags(name, version)
        against = tags.get("promote/against", "none")
        champion = None if against == "none" else int(against)
    inputs = [
        InputRef.output("evaluation", ev),
        InputRef.source("champion", f"models:/{name}/{champion}", str(champion)),
    ]
    champion_eval, same = None, False
    if champion is not None and not already:
        tags = tracking.model_version_tags(name, champion)
        champion_uri = tags.get("eval/output_uri", "")
        if not (champion_uri and stage.is_committed(champion_uri)):
            raise InputError(
                f"promote: the champion {name} v{champion} has no committed evaluation (eval/output_uri): "
                f"evaluate its samples first, or move @{CHAMPION} by hand"
            )
        champion_eval = stage.read_manifest(champion_uri)
        same = tags.get("eval/protocol") == ev.extra.get("protocol")
    return PromotePlan(
        tuple(inputs),
        name,
        version,
        dict(ev.figures),
        ev.extra.get("protocol", ""),
        champion,
        champion_eval,
        same,
        ev.config,
        already,
    )


def _champion_figures(cfg: PromoteConfig, p: PromotePlan, experiment: str) -> tuple[dict[str, float], str]:
    """The champion's figures under the candidate's protocol: its committed evaluation, or its
    samples evaluated again with the candidate's evaluate config."""
    from stages import evaluate

    old = p.champion_evaluation
    if p.same_protocol:
        return dict(old.figures), old.output_uri
    samples = next(i.uri for i in old.inputs if i.name == "generated")
    ev_cfg = config_lib.from_dict(evaluate.EvaluateConfig, p.evaluation_config)
    out = f"{cfg.output_uri.rstrip('/')}-champion-v{p.champion}"
    log.info(
        "promote: the champion's evaluation used another protocol; evaluating its samples %s again", samples
    )
    again = dataclasses.replace(ev_cfg, generated_uri=samples, output_uri=out, resources=cfg.resources)
    res = evaluate.run(again, experiment)
    return dict(res.figures), out


def decide(gates: Gates, candidate: dict[str, float], champion: dict[str, float] | None) -> list[str]:
    """The failed checks (empty: promote), as MLflow's validation words them; a gated metric the
    candidate's evaluation lacks fails, naming it."""
    import mlflow
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    active = gates.active()
    failed = [
        f"{k}: not in the candidate's evaluation (its figures: {', '.join(sorted(candidate))})"
        for k in active
        if k not in candidate
    ]
    missing_base = [k for k in active if champion is not None and k not in champion]
    failed += [f"{k}: not in the champion's evaluation" for k in missing_base]
    thresholds = {
        k: t
        for k, g in active.items()
        if k in candidate and k not in missing_base
        if (t := g.metric_threshold(k not in Gates.LOWER_IS_BETTER, champion.get(k) if champion else None))
        is not None
    }
    if thresholds:
        mlflow_log = logging.getLogger("mlflow.models.evaluation.validation")
        level = mlflow_log.level
        mlflow_log.setLevel(logging.WARNING)  # its "Validating ..." lines: the stage says what it decided
        try:
            mlflow.validate_evaluation_results(
                thresholds,
                EvaluationResult({k: candidate[k] for k in thresholds}, {}),
                EvaluationResult({k: champion[k] for k in thresholds}, {}) if champion else None,
            )
        except ModelValidationFailedException as e:
            failed += [line.strip() for line in str(e).splitlines() if line.strip()]
        finally:
            mlflow_log.setLevel(level)
    return failed


def run(cfg: PromoteConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    p = plan(cfg)
    job = StageRun(STAGE, cfg, p.inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    log.info("promote: %s", p.summary(cfg))
    with job:
        if p.already:  # decided before (the decision's output was removed): it stands
            champ, champ_eval, failed = {}, None, []
        else:
            champ, champ_eval = ({}, None) if p.champion is None else _champion_figures(cfg, p, experiment)
            failed = decide(cfg.gates, p.figures, champ if p.champion is not None else None)
        promoted = not failed
        active = cfg.gates.active()
        gated = {k: {"candidate": p.figures.get(k), "champion": champ.get(k)} for k in active}
        decision = {
            "model": p.name,
            "candidate_version": p.candidate,
            "champion_version": p.champion,
            "champion_evaluation_uri": champ_eval,
            "promoted": promoted,
            "failed": failed,
            "figures": gated,
            "gates": {
                k: {r: v for r, v in dataclasses.asdict(g).items() if v is not None}
                for k, g in active.items()
            },
            "protocol": p.protocol,
        }
        if promoted and not p.already:
            if p.champion is not None:
                tracking.set_model_alias(p.name, PREVIOUS, p.champion)
            tracking.set_model_alias(p.name, CHAMPION, p.candidate)
        tags = {
            "promote/decision": "promoted" if promoted else "refused",
            "promote/against": str(p.champion) if p.champion is not None else "none",
            "promote/failed": "; ".join(failed)[:4000] or "none",
            "promote/gates": json.dumps(decision["gates"], sort_keys=True)[:4000],
        }
        for k, v in gated.items():
            tags.update({f"promote/{k}/{who}": f"{x:.6g}" for who, x in v.items() if x is not None})
        if not p.already:  # the evaluation's own tags too: the champion's evaluation, found by the next run
            tags.update(tracking.evaluation_tags(p.figures, p.protocol, cfg.evaluation_uri))
            tracking.tag_model_version(p.name, p.candidate, tags)
        if p.already:
            log.info(
                "promote: %s v%d stays @%s (this evaluation is not judged again)",
                p.name,
                p.candidate,
                CHAMPION,
            )
        elif promoted:
            log.info("promote: %s v%d is now @%s%s", p.name, p.candidate, CHAMPION, _was(p))
        else:
            log.warning("promote: %s v%d stays a candidate: %s", p.name, p.candidate, "; ".join(failed))
        marker = job.out.write_file(0, "decision.json", json.dumps(decision, indent=2).encode())
        return job.commit(
            [marker],
            counts={"promoted": int(promoted)},
            figures={"promoted": float(promoted)},
            extra={"decision": decision},
        )


def _was(p: PromotePlan) -> str:
    return f" (v{p.champion} is @{PREVIOUS})" if p.champion is not None else " (the first champion)"


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, PromoteConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
