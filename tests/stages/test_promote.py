"""The registry gate: @champion moves only to a generator whose evaluation beats the champion's.

Generated sets whose answer is known stand in for samples of registered generator versions (the
bars of ``test_evaluate.patterns``: a good set, the same images with shuffled labels as a worse
generator, copies of training images as an overfit one); the registry is the session's MLflow
server. Inception is off (it costs ~0.3 s an image here), so the gates are the classifier score
and the overfit bounds, and the default FID gate's refusal is tested on its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from infra import model_store, storage, tracking
from models.evaluation import ClassifierRecipe
from stages import evaluate, promote
from stages.evaluate import EvaluateConfig
from stages.promote import Gate, Gates, PromoteConfig
from tests.stages.test_evaluate import CLASSES, image_set, patterns

pytestmark = pytest.mark.services
EXP = "test-promote"
NAME = "test-promote-gen"
# 60 random-bar images: ~7% fall within the 1% quantile of real-to-train distances by chance
GATES = Gates(
    fid=None,
    classifier_score=Gate(worse_by_at_most=0.05, threshold=0.5),
    memorized_fraction=Gate(threshold=0.2),
)


@pytest.fixture(scope="module")
def world(stack, tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("promote")
    y_tr, y_te = np.arange(90) % CLASSES, np.arange(45) % CLASSES
    x_tr = patterns(y_tr, 0)
    real = image_set(
        str(root / "real"),
        np.concatenate([x_tr, patterns(y_te, 1)]),
        np.concatenate([y_tr, y_te]),
        ["train"] * 90 + ["test"] * 45,
    )
    with mlflow.start_run(experiment_id=mlflow.set_experiment(EXP).experiment_id):
        versions = [model_store.register(f"generator {i}".encode(), NAME, None)["version"] for i in range(4)]
    y = np.arange(60) % CLASSES
    sets = {
        "good": (patterns(y, 2), y),
        "shuffled": (patterns(y, 2), np.random.default_rng(3).permutation(y)),  # a worse generator
        "better": (patterns(y, 4), y),
        "copies": (x_tr[:60], y_tr[:60]),  # an overfit one: training images
    }
    uris = {
        k: image_set(str(root / k), x, labels, "train", registry=(NAME, v))
        for (k, (x, labels)), v in zip(sets.items(), versions)
    }
    return {"root": root, "real": real, "uris": uris, "versions": dict(zip(sets, versions))}


def _evaluate(world, which: str, **fields) -> str:
    cfg = EvaluateConfig(
        generated_uri=world["uris"][which],
        reference_uri=world["real"],
        output_uri=str(world["root"] / f"eval-{which}-{fields.get('seed', 0)}"),
        inception="off",
        classifier=ClassifierRecipe(epochs=20, batch_size=16, lr=3e-3),
        **fields,
    )
    return evaluate.run(cfg, EXP).output_uri


def _promote(world, which: str, evaluation: str, gates: Gates = GATES):
    tracking.set_model_alias(NAME, "candidate", world["versions"][which])
    out = str(world["root"] / f"promote-{which}-{abs(hash(evaluation)) % 10**6}")
    return promote.run(PromoteConfig(evaluation_uri=evaluation, output_uri=out, gates=gates), EXP)


def _alias(alias: str) -> int | None:
    return promote._version(NAME, alias)


def test_the_registry_gate(world):
    v = world["versions"]
    # no champion yet: the first candidate that passes the absolute bounds becomes it
    good_eval = _evaluate(world, "good")
    first = _promote(world, "good", good_eval)
    assert first.manifest.extra["decision"]["promoted"] and _alias("champion") == v["good"]
    assert _alias("previous") is None
    tags = tracking.model_version_tags(NAME, v["good"])
    assert tags["promote/decision"] == "promoted" and tags["promote/against"] == "none"
    assert float(tags["promote/classifier_score/candidate"]) > 0.9

    # a worse candidate (labels that do not match its images) is refused, naming the metric
    worse = _promote(world, "shuffled", _evaluate(world, "shuffled"))
    d = worse.manifest.extra["decision"]
    assert not d["promoted"] and d["champion_version"] == v["good"]
    assert any(f.startswith("Metric classifier_score value threshold check failed") for f in d["failed"]), d
    assert _alias("champion") == v["good"] and _alias("previous") is None
    assert tracking.model_version_tags(NAME, v["shuffled"])["promote/decision"] == "refused"

    # an overfit candidate (training images) is refused by the memorisation bound
    overfit = _promote(world, "copies", _evaluate(world, "copies"))
    assert any("memorized_fraction" in f for f in overfit.manifest.extra["decision"]["failed"])
    assert _alias("champion") == v["good"]

    # a better one, evaluated under another protocol (seed): the champion's samples are evaluated
    # again under the candidate's config, then it is promoted; the old champion becomes @previous
    better = _promote(world, "better", _evaluate(world, "better", seed=1))
    d = better.manifest.extra["decision"]
    assert d["promoted"] and d["champion_evaluation_uri"].endswith(f"-champion-v{v['good']}"), d
    assert _alias("champion") == v["better"] and _alias("previous") == v["good"]
    decision = json.loads(storage.read_bytes(better.manifest.data_uris()[0]))
    assert decision["figures"]["classifier_score"]["champion"] is not None
    assert decision["gates"]["classifier_score"] == {"worse_by_at_most": 0.05, "threshold": 0.5}

    # the same decision again: committed, nothing moves
    again = _promote(world, "better", _evaluate(world, "better", seed=1))
    assert again.cached and _alias("champion") == v["better"] and _alias("previous") == v["good"]

    # the champion's samples under another evaluation (as a rejection-sampling run of the same
    # version makes): decided before, it stands, the aliases stay
    evaluation = _evaluate(world, "better", seed=2)
    planned = promote.plan(PromoteConfig(evaluation_uri=evaluation, output_uri=str(world["root"] / "p2")))
    assert planned.already and "is @champion already" in planned.summary(PromoteConfig())
    other = _promote(world, "better", evaluation)
    assert not other.cached and other.manifest.extra["decision"]["promoted"]
    assert _alias("champion") == v["better"] and _alias("previous") == v["good"]


def test_a_gated_figure_the_evaluation_lacks_refuses(world):
    """The default gates include FID: an evaluation that skipped the Inception cannot promote."""
    failed = promote.decide(Gates(), {"classifier_score": 0.9, "memorized_fraction": 0.0}, None)
    assert any(f.startswith("fid: not in the candidate's evaluation") for f in failed)
    assert any(f.startswith("duplicate_fraction: not in") for f in failed)
    # relative gates need a champion; absolute ones apply to the first
    ok = {"fid": 30.0, "classifier_score": 0.8, "memorized_fraction": 0.0, "duplicate_fraction": 0.0}
    assert promote.decide(Gates(), ok, None) == []
    champion = {**ok, "fid": 30.1}
    assert any("fid minimum relative change" in f for f in promote.decide(Gates(), ok, champion))
    assert promote.decide(Gates(), ok, {**ok, "fid": 31.0}) == []


def test_wrong_inputs_fail_before_any_work(world, tmp_path):
    with pytest.raises(ValueError, match="better_by must be > 0"):
        Gate(better_by=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        Gate()
    ev = _evaluate(world, "good")
    tracking.set_model_alias(NAME, "candidate", world["versions"]["shuffled"])
    with pytest.raises(promote.InputError, match="the evaluation is of test-promote-gen v"):
        promote.plan(PromoteConfig(evaluation_uri=ev, output_uri=str(tmp_path / "p")))
    with pytest.raises(promote.InputError, match="not an evaluation"):
        promote.plan(PromoteConfig(evaluation_uri=world["real"], output_uri=str(tmp_path / "p")))
    assert not storage.exists(str(tmp_path / "p"))
