"""Sample: a generator -> a generated dataset, in the image-shard format every stage reads.

The generator is a ``train_gpt`` model (a native checkpoint path, ``s3://``, a committed
``train_gpt`` output, ``models:/<name>@<alias>``) or an official taming ``Net2NetTransformer``
release. What to generate:
- unconditional models: ``num_samples``;
- class-conditional models: ``samples_per_class`` of every class (or of the classes in ``labels``),
  or ``num_samples`` spread over them in turn, or ``labels`` alone (one sample per entry); labels
  are ids or the names the data recorded;
- depth / segmentation / edges / lowres models: ``conditions_uri``, code shards whose
  ``<condition>_codes`` rows (the un-augmented views, of ``conditions_split`` if set; ``held-out``:
  the held-out split, val else test, the pipeline's default) are the spatial conditions, or image
  shards of condition maps (your own: see ``stages.sample_conditions``; larger than the training
  size: a larger image), ``samples_per_condition`` each (``num_samples`` caps the total).
The sampler (``sampler``, ``models.sampling.SamplerOptions``): ``temperature``, ``top_k``,
``top_p``, ``greedy``, classifier-free guidance ``cfg_scale`` (``cfg_schedule`` constant, or linear
from 1 at the first position to ``cfg_scale`` at the last); a ``grid`` larger than the training grid
samples with the sliding window (``window`` exact, the official rule, or strided), or in one pass
for a generator with local attention (``train_gpt.attention``: its window slides with the
position; ``window`` is unused).

Sample ``i`` depends on (``seed``, ``i``), the generator, the sampler options and ``tile`` alone
(see ``models.sampling``): not on ``batch_size``, the number of actors, the devices or a resume.
The sample indices are cut into shards of ``samples_per_shard``; a Ray Data actor pool (generator
and tokenizer loaded once per actor, KV cache, bf16 on GPU) samples, decodes and PNG-encodes a
shard per call. Rows: the image-shard columns (``image_id``, ``image``, ``label``, ``split``,
``source_uri``, ``source_width``, ``source_height``: the generated size), ``codes``,
``sample_index``, ``seed`` and, for spatial conditions, ``condition_image_id``; the descriptor
(``infra.image_shards.GeneratedImageShards``) records the lineage: the generator (URI, sha256,
registry name and version, its training run), the tokenizer's sha256 and the sampler options. A
grid of samples per class (per condition, beside it decoded) goes to the stage's MLflow run.

    python -m stages.sample model_uri=models:/demo-gpt@candidate output_uri=... samples_per_class=8 \\
        seed=0 batch_size=16 resources.workers=2 sampler.top_k=100 sampler.cfg_scale=2.0
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from infra import config as config_lib
from infra import model_store, pool, previews, schemas, stage, tracking
from infra.config import execution_field, input_field, output_field
from infra.devices import Precision, Resources, placement
from infra.image_shards import GeneratedImageShards, Generation
from infra.stage import InputError, InputRef, ShardMarker, StageResult, StageRun
from models.gpt import GPTConfig
from models.net2net import GeneratorSpec
from models.sampler_options import SamplerOptions
from stages import sample_conditions

log = logging.getLogger(__name__)
STAGE = "sample"
HEADLINE = ("samples", "images_per_s")  # the figures a pipeline's summary shows for this stage


@dataclass(frozen=True)
class SampleConfig:
    model_uri: str = input_field()  # the generator ("" = the pipeline's train_gpt output)
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    num_samples: int | None = None  # unconditional: how many; class: spread over the classes; spatial: a cap
    samples_per_class: int | None = None  # class: this many of every class (or of each in `labels`)
    labels: list[int | str] | None = None  # class: these labels (ids or names); alone: one sample each
    conditions_uri: str | None = input_field(
        None
    )  # spatial: code shards of condition codes, or condition maps
    condition_tokenizer_uri: str | None = input_field(
        None
    )  # maps: tokenize with this copy (its sha256 must match)
    samples_per_condition: int = 1  # spatial: samples per condition row
    conditions_split: str | None = None  # spatial: only condition rows of this split (None: all; held-out)
    grid: list[int] | None = None  # [h, w] codes; None: the training grid; larger: sliding window
    seed: int = 0  # sample i draws from the stream of (seed, i) alone
    # temperature, top_k, top_p, greedy, cfg_scale and cfg_schedule, the sliding window's rule
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    tile: int = 8  # samples per compute tile: fixes the shapes every forward runs at (models.sampling)
    split: Literal["train", "val", "test"] = "train"  # the split of the generated rows
    samples_per_shard: int = 1000  # rows per output shard (a resume redoes at most one)
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    tokenizer_uri: str | None = input_field(None)  # decode with this copy (its sha256 must match)
    # rejection sampling (class-conditional): each sample keeps the best of round(1 / acceptance_rate)
    # candidates by the probability classifier_uri gives its class (taming's acceptance rate)
    acceptance_rate: float = 1.0
    classifier_uri: str | None = input_field(None)  # a committed evaluate output, a file or models:/...
    # execution only (not part of the identity)
    batch_size: int = execution_field(16)  # samples per generate call (rounded up to a multiple of tile)
    resources: Resources = execution_field(default_factory=Resources)  # workers: actors, a generator each
    grid_samples: int = execution_field(8)  # columns of the logged sample grid

    def __post_init__(self):
        for name in ("num_samples", "samples_per_class", "samples_per_shard", "tile", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.samples_per_condition < 1:
            raise ValueError("samples_per_condition must be >= 1")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if not 0 < self.acceptance_rate <= 1:
            raise ValueError(f"acceptance_rate must lie in (0, 1], got {self.acceptance_rate}")
        k = 1 / self.acceptance_rate
        if abs(k - round(k)) > 1e-6:
            raise ValueError(
                f"acceptance_rate must be 1/k for a whole k (1, 0.5, 0.25, 0.1...): {self.acceptance_rate}"
            )
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"grid must be [h, w] with positive sides, got {self.grid}")


@dataclass(frozen=True)
class SamplePlan:
    """What the driver worked out from the generator's header and the inputs' manifests (no model
    loaded: each actor loads the generator and the tokenizer once)."""

    inputs: tuple[InputRef, ...]
    model_uri: str  # pinned: a registry alias resolved to its version
    generator_sha256: str
    spec: GeneratorSpec
    gpt: GPTConfig
    tokenizer_uri: str | None  # None: the generator bundles it (official releases)
    tokenizer_sha256: str
    grid: tuple[int, int]
    n: int  # samples
    labels: tuple[int, ...] | None  # class: the label of each sample
    conditions: sample_conditions.Conditions | None
    dataset: GeneratedImageShards
    candidates: int = 1  # per sample (rejection sampling: the best by the classifier is kept)
    classifier: tuple[str, str] | None = None  # (URI, sha256) of the classifier that ranks them

    def summary(self, cfg: SampleConfig) -> str:
        what = f"{self.spec.condition.mode} generator {self.model_uri}"
        return (
            f"{self.n:,} samples of {self.grid[0]}x{self.grid[1]} codes from the {what} "
            f"(sha256 {self.generator_sha256[:12]}) in "
            f"{stage.counted(-(-self.n // cfg.samples_per_shard), 'shard')} on {cfg.resources.describe()}"
            + (f", each the best of {self.candidates} by {self.classifier[0]}" if self.classifier else "")
        )


def _class_labels(cfg: SampleConfig, spec: GeneratorSpec) -> list[int]:
    names = spec.label_names or []
    n_classes = spec.condition.n_classes

    def label_id(v: int | str) -> int:
        if isinstance(v, str):
            if v in names:
                return names.index(v)
            raise InputError(f"sample.labels: unknown label {v!r}; the generator knows {names or 'no names'}")
        if not 0 <= v < n_classes:
            known = f" ({', '.join(names)})" if names else ""
            raise InputError(
                f"sample.labels: unknown label {v}; the generator has classes 0..{n_classes - 1}{known}"
            )
        return v

    chosen = [label_id(v) for v in cfg.labels] if cfg.labels is not None else list(range(n_classes))
    if not chosen:
        raise InputError("sample.labels is empty")
    if cfg.samples_per_class is not None and cfg.num_samples is not None:
        raise config_lib.ConfigError("sample: set samples_per_class or num_samples, not both")
    if cfg.samples_per_class is not None:  # interleaved: every shard mixes the classes
        return [c for _ in range(cfg.samples_per_class) for c in chosen]
    if cfg.num_samples is not None:
        return [chosen[i % len(chosen)] for i in range(cfg.num_samples)]
    if cfg.labels is not None:
        return chosen
    raise config_lib.ConfigError(
        "sample: a class-conditional generator needs samples_per_class, num_samples or labels"
    )


def _check_grid(cfg: SampleConfig, spec: GeneratorSpec, gpt: GPTConfig, grid=None) -> tuple[int, int]:
    """The sampling grid (``grid``, else ``sample.grid``, else the training grid), checked."""
    grid = tuple(grid or cfg.grid or spec.grid)
    g = tuple(spec.grid)
    if spec.objective == "masked" and grid != g:  # no sliding window for a bidirectional model
        raise InputError(
            f"sample.grid {list(grid)}: a masked generator samples its {g[0]}x{g[1]} training grid only "
            "(train a raster one, train_gpt.objective=autoregressive, for larger images)"
        )
    if spec.objective == "masked" and cfg.sampler.steps > g[0] * g[1]:
        raise InputError(
            f"sample.sampler.steps={cfg.sampler.steps}: more passes than the grid's {g[0] * g[1]} codes"
        )
    if grid != g and gpt.is_local:  # one pass: the local window slides by itself
        try:
            gpt.window(grid)
        except ValueError as e:
            raise InputError(f"sample.grid {list(grid)}: {e}") from None
    elif grid != g:  # the sliding window
        if g[0] != g[1]:
            raise InputError(f"sample.grid: the sliding window needs a square training grid, not {spec.grid}")
        if grid[0] < g[0] or grid[1] < g[1]:
            raise InputError(f"sample.grid {list(grid)} is smaller than the training grid {list(g)}")
    return grid


def plan(cfg: SampleConfig) -> SamplePlan:
    """Check everything against the generator's header before any work; every problem fails here,
    naming it."""
    if not cfg.model_uri:
        raise config_lib.ConfigError("sample.model_uri is not set")
    pinned, reg_name, reg_version, run_id = model_store.pin(cfg.model_uri)
    gen = model_store.describe_generator(pinned)  # FileNotFoundError / InputError name the URI
    spec, mode = gen.spec, gen.spec.condition.mode
    if mode == "coord":
        raise InputError("sample: coord-conditioned generators are not supported by the sample stage yet")
    grid = _check_grid(cfg, spec, gen.gpt)
    if cfg.sampler.cfg_scale is not None and spec.condition.null_token is None:
        raise InputError(
            f"sample.sampler.cfg_scale: {cfg.model_uri} was trained without a null condition "
            "(cond_dropout 0), so classifier-free guidance is not possible"
        )
    inputs = [InputRef.weights("generator", pinned, gen.sha256)]
    labels, conditions = None, None
    if mode == "unconditional":
        if cfg.samples_per_class is not None or cfg.labels is not None or cfg.conditions_uri:
            raise config_lib.ConfigError(
                "sample: the generator is unconditional; set num_samples (not samples_per_class, labels "
                "or conditions_uri)"
            )
        if cfg.num_samples is None:
            raise config_lib.ConfigError("sample.num_samples: an unconditional generator needs it")
        n = cfg.num_samples
    elif mode == "class":
        if cfg.conditions_uri:
            raise config_lib.ConfigError("sample.conditions_uri: the generator is class-conditional")
        labels = tuple(_class_labels(cfg, spec))
        n = len(labels)
    else:
        if cfg.samples_per_class is not None or cfg.labels is not None:
            raise config_lib.ConfigError("sample: the generator is spatially conditioned; use conditions_uri")
        conditions, ref, map_grid = sample_conditions.find(cfg, spec)
        if map_grid is not None:  # condition maps fix the grid
            grid = _check_grid(cfg, spec, gen.gpt, map_grid)
        sample_conditions.check_length(conditions, spec, grid, f"the `{conditions.column}` rows of {ref.uri}")
        inputs.append(ref)
        if conditions.maps is not None:
            inputs.append(
                InputRef.weights("condition_tokenizer", conditions.tokenizer_uri, conditions.tokenizer_sha256)
            )
        spc = cfg.samples_per_condition
        n = len(conditions.rows) * spc
        n = min(n, cfg.num_samples) if cfg.num_samples is not None else n
        conditions = conditions.first(-(-n // spc))
    if gen.first_stage is not None:  # an official release decodes with its own first stage
        if cfg.tokenizer_uri:
            raise config_lib.ConfigError(
                f"sample.tokenizer_uri: {cfg.model_uri} is an official release that bundles its tokenizer"
            )
        tok_uri, tok_sha, tok_cfg = None, gen.sha256, gen.first_stage
    else:
        tok_uri = cfg.tokenizer_uri or spec.tokenizer_uri
        tok = model_store.describe_tokenizer(tok_uri, spec.tokenizer_sha256, f"generator {cfg.model_uri}")
        tok_sha, tok_cfg = tok.sha256, tok.config
        inputs.append(InputRef.weights("tokenizer", tok_uri, tok_sha))
    f = tok_cfg.downsample_factor
    generation = Generation(
        generator_uri=cfg.model_uri,
        pinned_uri=pinned,
        generator_sha256=gen.sha256,
        generator_format=gen.format,
        registry_name=reg_name,
        registry_version=reg_version,
        training_run_id=run_id,
        condition=mode,
        tokenizer_uri=tok_uri,
        tokenizer_sha256=tok_sha,
        grid=grid,
        codebook_size=spec.codebook_size,
        sampler=cfg.sampler,
        seed=cfg.seed,
        tile=cfg.tile,
        conditions_uri=conditions.uri if conditions else None,
        conditions_column=conditions.column if conditions else None,
        conditions_split=conditions.split if conditions else None,
        samples_per_condition=cfg.samples_per_condition,
        condition_rows=len(conditions.rows) if conditions else 0,
        label_counts={str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
        if labels
        else None,
        acceptance_rate=cfg.acceptance_rate,
        classifier_sha256=None,
    )
    size = (grid[0] * f, grid[1] * f)
    classifier = _classifier(cfg, mode, spec, tok_cfg.out_channels, size)
    if classifier is not None:
        inputs.append(InputRef.weights("classifier", *classifier))
        generation = dataclasses.replace(generation, classifier_sha256=classifier[1])
    dataset = GeneratedImageShards(
        channels=tok_cfg.out_channels,
        size=size,
        label_names=spec.label_names,
        generation=generation,
    )
    return SamplePlan(
        tuple(inputs),
        pinned,
        gen.sha256,
        spec,
        gen.gpt,
        tok_uri,
        tok_sha,
        grid,
        n,
        labels,
        conditions,
        dataset,
        round(1 / cfg.acceptance_rate),
        classifier,
    )


def _classifier(
    cfg: SampleConfig, mode: str, spec: GeneratorSpec, channels: int, size
) -> tuple[str, str] | None:
    """(URI, sha256) of the classifier rejection sampling ranks by, checked against the generator."""
    if cfg.acceptance_rate == 1:
        if cfg.classifier_uri:
            raise config_lib.ConfigError("sample.classifier_uri is only used with acceptance_rate < 1")
        return None
    if mode != "class":
        raise config_lib.ConfigError(
            "sample.acceptance_rate: rejection sampling ranks by a classifier's probability of the sample's "
            f"class, and the generator is {mode}"
        )
    if not cfg.classifier_uri:
        raise config_lib.ConfigError(
            "sample.acceptance_rate < 1 needs classifier_uri: an evaluate output (its classifier.safetensors "
            "trained on real images), the file, or models:/<name>@<alias> (evaluate.register_classifier)"
        )
    h = model_store.describe(cfg.classifier_uri)
    if h.kind != "classifier":
        raise InputError(
            f"sample.classifier_uri: {cfg.classifier_uri} holds a {h.kind} model, not a classifier"
        )
    c = h.config
    theirs = (spec.condition.n_classes, channels, tuple(size))
    if (c.classes, c.in_chans, tuple(c.size)) != theirs:
        raise InputError(
            f"sample.classifier_uri: the classifier takes {c.classes} classes of {c.in_chans}-channel "
            f"{c.size[0]}x{c.size[1]} images; the generator makes {theirs[0]} classes of {theirs[1]}-channel "
            f"{theirs[2][0]}x{theirs[2][1]} images"
        )
    return cfg.classifier_uri, h.sha256


def _items(cfg: SampleConfig, p: SamplePlan) -> list[dict[str, Any]]:
    """Shard k: samples [k * samples_per_shard, ...), with their labels or condition rows."""
    items = []
    for lo in range(0, max(p.n, 1), cfg.samples_per_shard):
        hi = min(lo + cfg.samples_per_shard, p.n)
        item: dict[str, Any] = {"lo": lo, "hi": hi}
        if p.labels is not None:
            item["labels"] = list(p.labels[lo:hi])
        if p.conditions is not None:
            item.update(sample_conditions.items(p.conditions, lo, hi, cfg.samples_per_condition))
        items.append(item)
    return items


def image_id(identity: str, index: int) -> str:
    """The stable id of generated sample ``index`` of an output identity."""
    return hashlib.sha256(f"{identity}:{index}".encode()).hexdigest()[:32]


class SampleShards(pool.Worker):
    """Ray Data actor: loads the generator and the tokenizer once, then samples whole shards."""

    def __init__(self, cfg: SampleConfig, p: SamplePlan, out: stage.StageOutput):
        import torch

        from models.sampling import rows_independent

        t0 = time.perf_counter()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # in the actor
        self.cfg, self.p, self.out, self.schema = cfg, p, out, p.dataset.schema()
        place = placement(cfg.resources, cfg.precision)
        self.device, self.dtype, self.threads = place.device, place.dtype, place.threads
        gen = model_store.load_generator(p.model_uri, p.generator_sha256)
        self.gpt = gen.gpt.to(self.device, self.dtype).eval()
        tok = (
            gen.first_stage
            if p.tokenizer_uri is None
            else model_store.load_tokenizer(p.tokenizer_uri, p.tokenizer_sha256)
        )
        self.tokenizer = tok.to(self.device, self.dtype).eval()
        self.conditions = (
            None if p.conditions is None else sample_conditions.Reader(p.conditions, self.device, self.dtype)
        )
        self.classifier = None
        if p.classifier is not None:  # rejection sampling: the candidates' ranking, in fp32
            self.classifier = model_store.load(*p.classifier).model.to(self.device).eval()
        with torch.inference_mode():
            self.whole_batch = rows_independent(self.gpt, p.spec.prefix_length, cfg.tile)
        log.info(
            "sample: actor ready in %.1f s (%s, %s; %s)",
            time.perf_counter() - t0,
            self.device,
            self.dtype,
            "whole batches" if self.whole_batch else f"rows differ by batch here: tile by tile ({cfg.tile})",
        )

    def _raw(self, item: dict[str, Any]):
        """The raw condition of every sample of the shard, and the condition image ids."""
        import torch

        lo, hi = item["lo"], item["hi"]
        if self.p.labels is not None:
            return torch.tensor(item["labels"], dtype=torch.long), None
        c = self.p.conditions
        if c is None:
            return torch.zeros(hi - lo, dtype=torch.long), None
        rows = [tuple(r) for r in item["cond_rows"]]
        got = self.conditions.read(rows)
        spc = self.cfg.samples_per_condition
        ordered = [got[rows[i // spc - item["cond_lo"]]] for i in range(lo, hi)]
        return torch.from_numpy(np.stack([o[1] for o in ordered])), [o[0] for o in ordered]

    def process(self, shard: int, item: dict[str, Any]) -> ShardMarker:
        import torch

        from infra.imaging import encode_pngs, to_uint8_images
        from models.sampling import decode_tiles, generate_codes, sample_uniforms, uniforms_needed

        cfg, p = self.cfg, self.p
        lo, hi = item["lo"], item["hi"]
        h, w = p.grid
        raw, cond_ids = self._raw(item)
        codes_all, pngs, kept_p, mean_p = [], [], [], []
        k = p.candidates
        step = max(1, cfg.batch_size // k)  # samples per generate call: k candidates each
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in range(lo, hi, step):
                e = min(b + step, hi)
                # candidate j of sample i is the row of index i * k + j: with k = 1, sample i itself
                rows = [i * k + j for i in range(b, e) for j in range(k)]
                u = sample_uniforms(cfg.seed, rows, uniforms_needed(p.spec, cfg.sampler, p.grid))
                cond = raw[b - lo : e - lo].repeat_interleave(k, 0)
                codes = generate_codes(
                    self.gpt,
                    p.spec,
                    cond,
                    u.to(self.device),
                    cfg.sampler,
                    grid=p.grid,
                    tile=cfg.tile,
                    whole_batch=self.whole_batch,
                )
                x = decode_tiles(self.tokenizer, codes.reshape(-1, h, w), cfg.tile)
                if self.classifier is not None:
                    x_u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # as the PNGs
                    prob = self.classifier.probability(x_u8, cond).reshape(e - b, k).cpu()
                    keep = torch.arange(e - b) * k + prob.argmax(1)  # the first best on ties
                    codes, x = codes[keep.to(codes.device)], x[keep.to(x.device)]
                    kept_p.append(prob.max(1).values)
                    mean_p.append(prob.mean(1))
                pngs += encode_pngs(to_uint8_images(x), self.threads)
                codes_all.append(codes.cpu().numpy())
                done = e - lo
                rate = done / max(time.perf_counter() - t0, 1e-9)
                log.info("sample: shard %d: %d/%d samples (%.1f images/s)", shard, done, hi - lo, rate)
        codes_np = np.concatenate(codes_all) if codes_all else np.zeros((0, h * w), np.int64)
        t = self._table(item, raw, cond_ids, codes_np, pngs)
        small = ["label", "split", "source_width", "source_height", "seed"]
        counts = {"read": hi - lo, "busy_ms": int(1000 * (time.perf_counter() - t0))}
        if kept_p:  # the classifier's mean probability of the class, kept vs all candidates (x 1e6)
            counts["kept_prob_ppm"] = int(1e6 * float(torch.cat(kept_p).sum()))
            counts["candidate_prob_ppm"] = int(1e6 * float(torch.cat(mean_p).sum()))
        return self.out.write_shard(
            shard,
            t,
            counts,
            use_dictionary=small,
            write_statistics=["sample_index", *small],
            compression_level=3,
        )

    def _table(self, item, raw, cond_ids, codes: np.ndarray, pngs: list[bytes]) -> pa.Table:
        cfg, p = self.cfg, self.p
        idx = list(range(item["lo"], item["hi"]))
        n = len(idx)
        height, width = p.dataset.size
        data = {
            "image_id": [image_id(self.out.identity, i) for i in idx],
            "image": schemas.image_column(pngs),
            "label": raw.tolist() if p.labels is not None else [None] * n,
            "split": [cfg.split] * n,
            "source_uri": [f"{p.model_uri}#seed={cfg.seed}&sample={i}" for i in idx],
            "source_width": [width] * n,
            "source_height": [height] * n,
            "codes": schemas.encode_codes(codes) if n else [],
            "sample_index": idx,
            "seed": [cfg.seed] * n,
        }
        if p.conditions is not None:
            data["condition_image_id"] = cond_ids
        return pa.table(data, schema=self.schema)


def _grid(cfg: SampleConfig, p: SamplePlan, out: stage.StageOutput, markers: list[ShardMarker]):
    """The logged preview: a row per class (or per condition: the condition first, the real image
    it came from last), or an n x n block of unconditional samples."""
    n = cfg.grid_samples
    key = "label" if p.labels is not None else ("condition_image_id" if p.conditions else None)
    files = [out.file_uri(f) for m in markers for f in m.data if f.rows]
    if key is None:
        block = previews.gather(files, None, n * n, 1).get(None)
        return previews.framed(block, n) if block else None
    keys = len(set(p.labels)) if p.labels is not None else len(p.conditions.rows)
    groups = previews.gather(files, key, n, min(keys, previews.MAX_GRID_ROWS))
    if not groups:
        return None
    if p.conditions:
        return previews.rows(groups, n, *sample_conditions.beside(p.conditions, list(groups)))
    names = p.spec.label_names or []
    return previews.rows(
        {k: groups[k] for k in sorted(groups)},
        max(len(v) for v in groups.values()),
        names=[names[k] if k < len(names) else str(k) for k in sorted(groups)],
    )


def run(cfg: SampleConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Sample (or resume, or reuse) a generated dataset."""
    p = plan(cfg)
    job = StageRun(STAGE, cfg, p.inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    log.info("sample: %s", p.summary(cfg))
    with job:
        tags = {"generator_sha256": p.generator_sha256, "generator_uri": p.model_uri}
        tracking.set_tags({**tags, "condition": p.spec.condition.mode})
        before = set(job.out.done_shards())  # shards a killed earlier attempt finished
        markers, reused = pool.map_items(
            SampleShards, (cfg, p, job.out), _items(cfg, p), job.out, cfg.resources
        )
        tally = stage.tally(STAGE, markers, expected=p.n)
        fresh = [m for m in markers if m.index not in before]
        new_rows = sum(m.rows for m in fresh)
        busy = sum(m.counts.get("busy_ms", 0) for m in fresh) / 1000
        seconds = job.seconds
        tokens = p.grid[0] * p.grid[1]
        figures = {
            "images_per_s": new_rows / max(seconds, 1e-9),
            "tokens_per_s": new_rows * tokens / max(seconds, 1e-9),
            # one actor's rate while it samples, decodes and encodes (start-up and writes excluded)
            "actor_images_per_s": new_rows / max(busy, 1e-9),
        }
        if p.classifier is not None:  # over the whole output (shards of an earlier attempt too)
            rows = sum(m.rows for m in markers)
            for name, key in (
                ("kept_class_probability", "kept_prob_ppm"),
                ("candidate_class_probability", "candidate_prob_ppm"),
            ):
                figures[name] = sum(m.counts.get(key, 0) for m in markers) / 1e6 / max(rows, 1)
        if (grid := _grid(cfg, p, job.out, markers)) is not None:
            tracking.log_image(grid, "samples/grid.png")
        return job.commit(
            markers,
            counts={"samples": tally["written"], "shards": len(markers), "reused_shards": reused},
            figures=figures,
            dataset=p.dataset,
        )


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, SampleConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
