from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from infra import config as C


@dataclass(frozen=True)
class Inner:
    size: int = 4
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    limit: int | None = None
    flag: bool = False


def test_load_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  size: 8\n")
    cfg = C.load(Outer, path, ["inner.rate=1", "inner.mode=b", "limit=null", "tags=[p, q]", "flag=true"])
    assert cfg == Outer(name="x", inner=Inner(size=8, rate=1.0, mode="b"), tags=["p", "q"], flag=True)
    assert isinstance(cfg.inner.rate, float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inner.sise=3"], "unknown config key inner.sise"),
        (["bogus=1"], "unknown config key bogus"),
        (["inner.size=big"], "inner.size: expected an integer"),
        (["inner.size=1.5"], "inner.size: expected an integer"),
        (["inner.size=true"], "inner.size: expected an integer"),
        (["inner.rate=fast"], "inner.rate: expected a number"),
        (["inner.mode=c"], "inner.mode: 'c' is not one of"),
        (["flag=1"], "flag: expected true or false"),
        (["name=null"], "name: null is not allowed"),
        (["limit=ten"], "limit: 'ten' does not fit"),
        (["name.x=1"], "name is a value, not a section"),
        (["noequals"], "must look like key.path=value"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(C.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        C.from_dict(Outer, C.apply_overrides({"name": "x"}, overrides))


def test_missing_required_key():
    with pytest.raises(C.ConfigError, match="missing required config key name"):
        C.from_dict(Outer, {})


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(Outer, tmp_path / "nope.yaml")


@dataclass(frozen=True)
class WithRoles:
    source_uri: str = C.input_field()
    output_uri: str = C.output_field()
    size: int = 4
    batch_size: int = C.execution_field(8)


def test_hash_ignores_fields_with_a_role_only():
    a = Outer(name="x", limit=3)
    assert C.config_hash(a) == C.config_hash(Outer(name="x", limit=3))
    assert C.config_hash(a) != C.config_hash(Outer(name="x", limit=4))
    base = C.config_hash(WithRoles())
    assert C.config_hash(WithRoles(source_uri="/a", output_uri="/b", batch_size=1)) == base
    assert C.config_hash(WithRoles(size=5)) != base
    assert C.role(WithRoles, "batch_size") == "execution" and C.role(WithRoles, "size") is None


@dataclass(frozen=True)
class Grown:  # WithRoles after it gained an option
    source_uri: str = C.input_field()
    output_uri: str = C.output_field()
    size: int = 4
    batch_size: int = C.execution_field(8)
    mode: str = C.added_field("plain")


def test_an_added_field_at_its_default_keeps_old_identities():
    assert C.config_hash(Grown()) == C.config_hash(WithRoles())
    assert C.config_hash(Grown(size=5)) == C.config_hash(WithRoles(size=5))
    assert C.config_hash(Grown(mode="fancy")) != C.config_hash(WithRoles())


def test_every_stage_location_has_a_role():
    """Every `*_uri` field of every stage config is declared an input or output field (so a
    location never changes an identity), and every stage asks for its resources in the one
    vocabulary (``resources``: workers, cpus_per_worker, gpus_per_worker), an execution field."""
    import typing

    from infra.devices import Resources
    from pipelines.full import STAGES, FullConfig

    hints = typing.get_type_hints(FullConfig)
    for name, _ in STAGES:
        cls = next(a for a in typing.get_args(hints[name]) or (hints[name],) if dataclasses.is_dataclass(a))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for f in fields.values():
            if f.name.endswith("_uri"):
                assert C.role(cls, f.name) in ("input", "output"), (name, f.name)
        assert C.role(cls, "resources") == "execution", name
        assert isinstance(fields["resources"].default_factory(), Resources), name
        assert not {"num_workers", "num_cpus", "num_gpus", "concurrency", "cpus_per_worker", "use_gpu"} & set(
            fields
        )


def test_stage_sections_nest_and_override_by_dotted_keys():
    """The sampler, the training recipes and the resources are typed sections: set in YAML or on the
    command line by their dotted keys, checked like any other key."""
    from stages.sample import SampleConfig
    from stages.train_gpt import TrainGPTConfig

    cfg = C.from_dict(
        SampleConfig,
        C.apply_overrides({"sampler": {"top_k": 100}}, ["sampler.cfg_scale=2", "resources.workers=3"]),
    )
    assert (cfg.sampler.top_k, cfg.sampler.cfg_scale, cfg.resources.workers) == (100, 2.0, 3)
    gpt = C.from_dict(TrainGPTConfig, C.apply_overrides({}, ["recipe.lr=1e-3", "recipe.pkeep=0.9"]))
    assert (gpt.recipe.lr, gpt.recipe.pkeep) == (1e-3, 0.9)
    with pytest.raises(C.ConfigError, match="unknown config key sampler.topk"):
        C.from_dict(SampleConfig, C.apply_overrides({}, ["sampler.topk=3"]))
    with pytest.raises(C.ConfigError, match="pkeep must lie in"):
        C.from_dict(TrainGPTConfig, C.apply_overrides({}, ["recipe.pkeep=0"]))
    # the sections count in the identity, the resources do not
    assert C.config_hash(gpt) != C.config_hash(TrainGPTConfig())
    busy = C.from_dict(TrainGPTConfig, C.apply_overrides({}, ["resources.workers=8"]))
    assert C.config_hash(busy) == C.config_hash(TrainGPTConfig())


def test_flatten_and_yaml_roundtrip():
    cfg = Outer(name="x", tags=["a"])
    assert C.flatten(C.to_dict(cfg))["inner.size"] == 4
    import yaml

    assert C.from_dict(Outer, yaml.safe_load(C.to_yaml(cfg))) == cfg


def test_sampler_options_added_later_keep_old_identities():
    """The masked decoding options left out of an output's identity at their defaults (the metadata
    key models/ writes out must be infra.config's)."""
    import dataclasses

    from infra import config
    from models.sampler_options import SamplerOptions

    assert "steps" not in config.identity_dict(SamplerOptions())
    assert config.identity_dict(SamplerOptions(steps=12))["steps"] == 12
    assert all(
        f.metadata.get(config.OMIT_DEFAULT)
        for f in dataclasses.fields(SamplerOptions)
        if f.name in ("steps", "choice_temperature")
    )
