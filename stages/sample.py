"""Sample: a generator -> a generated dataset, in the image-shard format every stage reads.

The generator is a ``train_gpt`` model (a native checkpoint path, ``s3://``, a committed
``train_gpt`` output, ``models:/<name>@<alias>``) or an official taming ``Net2NetTransformer``
release. What to generate:
- unconditional models: ``num_samples``;
- class-conditional models: ``samples_per_class`` of every class (or of the classes in ``labels``),
  or ``num_samples`` spread over them in turn, or ``labels`` alone (one sample per entry); labels
  are ids or the names the data recorded;
- depth / segmentation models: ``conditions_uri``, code shards whose ``depth_codes`` /
  ``segmentation_codes`` rows (the un-augmented views, of ``conditions_split`` if set) are the
  spatial conditions, ``samples_per_condition`` each (``num_samples`` caps the total).
Sampler: ``temperature``, ``top_k``, ``top_p``, ``greedy``, classifier-free guidance
``cfg_scale`` (``cfg_schedule`` constant, or linear from 1 at the first position to ``cfg_scale``
at the last); a ``grid`` larger than the training grid samples with the sliding window
(``window`` exact, the official rule, or strided), or in one pass for a generator with local
attention (``train_gpt.attention``: its window slides with the position; ``window`` is unused).

Sample ``i`` depends on (``seed``, ``i``), the generator, the sampler options and ``tile`` alone
(see ``models.sampling``): not on ``batch_size``, the number of actors, the devices or a resume.
The sample indices are cut into shards of ``samples_per_shard``; a Ray Data actor pool (generator
and tokenizer loaded once per actor, KV cache, bf16 on GPU) samples, decodes and PNG-encodes a
shard per call. Rows: the image-shard columns (``image_id``, ``image``, ``label``, ``split``,
``source_uri``, ``width``, ``height``), ``codes``, ``sample_index``, ``seed`` and, for spatial
conditions, ``condition_image_id``. The manifest records the lineage: the generator (URI, sha256,
registry name and version, its training run), the tokenizer's sha256 and the sampler options.
A grid of samples per class (per condition, beside it decoded) goes to the stage's MLflow run.

    python -m stages.sample model_uri=models:/demo-gpt@candidate output_uri=... samples_per_class=8 \\
        seed=0 batch_size=16 concurrency=2 temperature=1.0 top_k=100 cfg_scale=2.0
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from infra import code_shards, model_store, pool, schemas, stage, storage, tracking
from infra import config as config_lib
from infra.config import execution_field, input_field, output_field
from infra.devices import Precision, placement
from infra.stage import InputError, InputRef, ShardMarker, StageResult, StageRun

log = logging.getLogger(__name__)
STAGE = "sample"
HEADLINE = ("samples", "images_per_s")  # the figures a pipeline's summary shows for this stage
MAX_GRID_ROWS = 16  # the MLflow grid: at most this many classes / conditions, one row each


@dataclass(frozen=True)
class SampleConfig:
    model_uri: str = input_field()  # the generator ("" = the pipeline's train_gpt output)
    output_uri: str = output_field()  # "" = derived by the pipeline from run.root_uri
    num_samples: int | None = None  # unconditional: how many; class: spread over the classes; spatial: a cap
    samples_per_class: int | None = None  # class: this many of every class (or of each in `labels`)
    labels: list[int | str] | None = None  # class: these labels (ids or names); alone: one sample each
    conditions_uri: str | None = input_field(None)  # spatial: code shards holding the condition codes
    samples_per_condition: int = 1  # spatial: samples per condition row
    conditions_split: str | None = None  # spatial: only condition rows of this split (None: all)
    grid: list[int] | None = None  # [h, w] codes; None: the training grid; larger: sliding window
    seed: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None  # classifier-free guidance (generators trained with cond_dropout)
    cfg_schedule: Literal["constant", "linear"] = "constant"
    greedy: bool = False
    window: Literal["exact", "strided"] = "exact"  # the sliding-window rule for larger grids
    window_stride: int | None = None  # strided: default a quarter of the window
    tile: int = 8  # samples per compute tile: fixes the shapes every forward runs at (models.sampling)
    split: str = "train"  # the split column of the generated rows
    samples_per_shard: int = 1000
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    tokenizer_uri: str | None = input_field(None)  # decode with this copy (its sha256 must match)
    # execution only (not part of the identity)
    batch_size: int = execution_field(16)  # samples per generate call (rounded up to a multiple of tile)
    concurrency: int = execution_field(1)  # actors (each holds the generator and the tokenizer)
    num_cpus: float = execution_field(1.0)  # per actor
    num_gpus: float = execution_field(0.0)  # per actor
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
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"grid must be [h, w] with positive sides, got {self.grid}")
        _ = self.options  # validates the sampler options

    @property
    def options(self):
        """The sampler keys as ``models.sampling.SamplerOptions`` (same names)."""
        import dataclasses

        from models.sampling import SamplerOptions

        return SamplerOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerOptions)})


@dataclass(frozen=True)
class Plan:
    """What the driver worked out before any work (all plain data: it travels to the actors)."""

    model_uri: str  # pinned: a registry alias resolved to its version
    generator_sha256: str
    spec: dict[str, Any]  # models.net2net.GeneratorSpec.to_dict()
    tokenizer_uri: str | None  # None: the generator bundles it (official releases)
    tokenizer_sha256: str | None
    grid: tuple[int, int]
    n: int  # samples
    labels: list[int] | None  # class: the label of each sample
    conditions: dict[str, Any] | None  # spatial: files, column, length, rows [(file, row)] per condition
    channels: int
    size: tuple[int, int]  # (height, width) of the generated images
    lineage: dict[str, Any]


def _generator_lineage(uri: str) -> tuple[str, dict[str, Any]]:
    """The pinned URI to load (an alias resolved now, so every actor loads the same version) and
    what the manifest records of where it came from."""
    out: dict[str, Any] = {"uri": uri, "registry": None, "training_run_id": None}
    if uri.startswith("models:/"):
        info = tracking.model_version_info(uri)  # FileNotFoundError naming the URI and registry
        out["registry"] = {"name": info["name"], "version": info["version"]}
        out["training_run_id"] = info["run_id"]
        return f"models:/{info['name']}/{info['version']}", out
    if stage.is_committed(uri):
        out["training_run_id"] = stage.read_manifest(uri).mlflow_run_id
    return uri, out


def _class_labels(cfg: SampleConfig, spec) -> list[int]:
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


def _spatial_conditions(cfg: SampleConfig, spec, grid: tuple[int, int]) -> tuple[dict[str, Any], InputRef]:
    if not cfg.conditions_uri:
        raise config_lib.ConfigError(
            "sample.conditions_uri: a spatially conditioned generator needs code shards holding its "
            "condition codes (depth_codes / segmentation_codes)"
        )
    m = stage.read_manifest(cfg.conditions_uri)
    info = code_shards.info(m)
    present = sorted(info["conditions"])
    column = spec.condition_column or (present[0] if len(present) == 1 else None)
    if column is None or column not in info["conditions"]:
        raise InputError(
            f"sample.conditions_uri: {cfg.conditions_uri} has no `{spec.condition_column or 'condition'}` "
            f"column (it holds {present or 'no condition codes'})"
        )
    k = info["conditions"][column]["codebook_size"]
    if k != spec.condition.cond_codebook_size:
        raise InputError(
            f"sample.conditions_uri: `{column}` of {cfg.conditions_uri} has a codebook of {k} codes; the "
            f"generator was trained on {spec.condition.cond_codebook_size}"
        )
    want_sha, have_sha = spec.condition_tokenizer_sha256, info["conditions"][column]["tokenizer_sha256"]
    if want_sha and have_sha and want_sha != have_sha:
        raise InputError(
            f"sample.conditions_uri: `{column}` of {cfg.conditions_uri} was made by the tokenizer with "
            f"sha256 {have_sha}, the generator was trained on codes of sha256 {want_sha}"
        )
    length = code_shards.condition_lengths(storage.parquet_schema(m.data_uris()[0]))[column]
    want = spec.prefix_length if tuple(grid) == tuple(spec.grid) else grid[0] * grid[1]
    if length != want:
        raise InputError(
            f"sample.conditions_uri: `{column}` rows hold {length} codes, the generator needs {want} "
            f"(for a {grid[0]}x{grid[1]} grid{'' if want == spec.prefix_length else ', sliding window'})"
        )
    rows: list[tuple[int, int]] = []
    for fi, uri in enumerate(m.data_uris()):
        t = storage.read_parquet(uri, ["aug_id", "split"])
        keep = t["aug_id"].to_numpy() == 0
        if cfg.conditions_split is not None:
            keep &= np.asarray(t["split"].to_pylist()) == cfg.conditions_split
        rows += [(fi, int(r)) for r in np.flatnonzero(keep)]
    if not rows:
        raise InputError(
            f"sample.conditions_uri: {cfg.conditions_uri} has no condition rows"
            + (f" in split {cfg.conditions_split!r}" if cfg.conditions_split else "")
        )
    cond_tok = next((i for i in m.inputs if i.name == f"{column}_tokenizer"), None)
    out = {
        "uri": m.output_uri,
        "files": m.data_uris(),
        "column": column,
        "length": length,
        "rows": rows,
        "tokenizer_uri": cond_tok.uri if cond_tok else None,
        "tokenizer_sha256": have_sha,
    }
    return out, InputRef.output("conditions", m)


def plan(cfg: SampleConfig):
    """Check everything against the generator before any work; returns (Plan, inputs, generator,
    tokenizer). Every problem fails here, naming it."""
    if not cfg.model_uri:
        raise config_lib.ConfigError("sample.model_uri is not set")
    pinned, lineage = _generator_lineage(cfg.model_uri)
    gen = model_store.load_generator(pinned)  # FileNotFoundError / InputError name the URI
    spec = gen.spec
    mode = spec.condition.mode
    if mode == "coord":
        raise InputError("sample: coord-conditioned generators are not supported by the sample stage yet")
    grid = tuple(cfg.grid) if cfg.grid is not None else tuple(spec.grid)
    g = tuple(spec.grid)
    if grid != g and gen.gpt.config.is_local:  # one pass: the local window slides by itself
        try:
            gen.gpt.config.window(grid)
        except ValueError as e:
            raise InputError(f"sample.grid {list(grid)}: {e}") from None
    elif grid != g:  # the sliding window
        if g[0] != g[1]:
            raise InputError(f"sample.grid: the sliding window needs a square training grid, not {spec.grid}")
        if grid[0] < g[0] or grid[1] < g[1]:
            raise InputError(f"sample.grid {list(grid)} is smaller than the training grid {list(g)}")
    if cfg.cfg_scale is not None and spec.condition.null_token is None:
        raise InputError(
            f"sample.cfg_scale: {cfg.model_uri} was trained without a null condition (cond_dropout 0), "
            "so classifier-free guidance is not possible"
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
        labels = _class_labels(cfg, spec)
        n = len(labels)
    else:
        if cfg.samples_per_class is not None or cfg.labels is not None:
            raise config_lib.ConfigError("sample: the generator is spatially conditioned; use conditions_uri")
        conditions, ref = _spatial_conditions(cfg, spec, grid)
        inputs.append(ref)
        n = len(conditions["rows"]) * cfg.samples_per_condition
        n = min(n, cfg.num_samples) if cfg.num_samples is not None else n
        conditions["rows"] = conditions["rows"][: -(-n // cfg.samples_per_condition)]
    if gen.first_stage is not None:
        if cfg.tokenizer_uri:
            raise config_lib.ConfigError(
                f"sample.tokenizer_uri: {cfg.model_uri} is an official release that bundles its tokenizer"
            )
        tok_uri, tok_sha, tokenizer = None, None, gen.first_stage
    else:
        tok_uri = cfg.tokenizer_uri or spec.tokenizer_uri
        loaded = model_store.load_tokenizer(tok_uri, spec.tokenizer_sha256, f"generator {cfg.model_uri}")
        tok_uri, tok_sha, tokenizer = loaded.uri, loaded.sha256, loaded.model
        inputs.append(InputRef.weights("tokenizer", tok_uri, tok_sha))
    f = tokenizer.config.downsample_factor
    lineage.update(sha256=gen.sha256, kind=gen.kind, condition=mode)
    p = Plan(
        model_uri=pinned,
        generator_sha256=gen.sha256,
        spec=spec.to_dict(),
        tokenizer_uri=tok_uri,
        tokenizer_sha256=tok_sha or gen.sha256,
        grid=grid,
        n=n,
        labels=labels,
        conditions=conditions,
        channels=tokenizer.config.out_channels,
        size=(grid[0] * f, grid[1] * f),
        lineage=lineage,
    )
    return p, inputs, gen, tokenizer


def _items(cfg: SampleConfig, p: Plan) -> list[dict[str, Any]]:
    """Shard k: samples [k * samples_per_shard, ...), with their labels or condition rows."""
    items = []
    for lo in range(0, max(p.n, 1), cfg.samples_per_shard):
        hi = min(lo + cfg.samples_per_shard, p.n)
        item: dict[str, Any] = {"lo": lo, "hi": hi}
        if p.labels is not None:
            item["labels"] = p.labels[lo:hi]
        if p.conditions is not None:
            spc = cfg.samples_per_condition
            item["cond_lo"] = lo // spc
            item["cond_rows"] = p.conditions["rows"][lo // spc : -(-hi // spc)]
        items.append(item)
    return items


def _condition_rows(c: dict[str, Any], rows) -> dict[tuple[int, int], tuple[str, np.ndarray]]:
    """(file, row) -> (image_id, condition codes) of the condition rows asked for, one read per file."""
    by_file: dict[int, list[int]] = {}
    for fi, r in rows:
        by_file.setdefault(int(fi), []).append(int(r))
    got: dict[tuple[int, int], tuple[str, np.ndarray]] = {}
    for fi, rs in by_file.items():
        t = storage.read_parquet(c["files"][fi], ["image_id", c["column"]]).take(rs)
        codes = schemas.decode_codes(t[c["column"]], c["length"])
        for r, iid, row in zip(rs, t["image_id"].to_pylist(), codes):
            got[(fi, r)] = (iid, row)
    return got


def image_id(identity: str, index: int) -> str:
    """The stable id of generated sample ``index`` of an output identity."""
    return hashlib.sha256(f"{identity}:{index}".encode()).hexdigest()[:32]


class SampleShards(pool.Worker):
    """Ray Data actor: loads the generator and the tokenizer once, then samples whole shards."""

    def __init__(self, cfg: SampleConfig, p: Plan, out: stage.StageOutput, metadata: dict[str, str]):
        import torch

        from models.net2net import GeneratorSpec
        from models.sampling import rows_independent

        t0 = time.perf_counter()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # in the actor
        self.cfg, self.p, self.out, self.metadata = cfg, p, out, metadata
        place = placement(cfg.num_cpus, cfg.num_gpus, cfg.precision)
        self.device, self.dtype, self.threads = place.device, place.dtype, place.threads
        gen = model_store.load_generator(p.model_uri)
        if gen.sha256 != p.generator_sha256:
            raise InputError(f"{p.model_uri} changed while sampling (sha256 {gen.sha256})")
        self.spec = GeneratorSpec.from_dict(p.spec)
        self.gpt = gen.gpt.to(self.device, self.dtype).eval()
        if p.tokenizer_uri is None:
            tok = gen.first_stage
        else:
            tok = model_store.load_tokenizer(
                p.tokenizer_uri, p.tokenizer_sha256, f"generator {p.model_uri}"
            ).model
        self.tokenizer = tok.to(self.device, self.dtype).eval()
        with torch.inference_mode():
            self.whole_batch = rows_independent(self.gpt, self.spec.prefix_length, cfg.tile)
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
        if self.p.conditions is None:
            return torch.zeros(hi - lo, dtype=torch.long), None
        got = _condition_rows(self.p.conditions, item["cond_rows"])
        spc = self.cfg.samples_per_condition
        ordered = [got[tuple(item["cond_rows"][i // spc - item["cond_lo"]])] for i in range(lo, hi)]
        raw = torch.from_numpy(np.stack([o[1] for o in ordered]))
        return raw, [o[0] for o in ordered]

    def process(self, shard: int, item: dict[str, Any]) -> ShardMarker:
        import torch

        from infra.imaging import encode_pngs, to_uint8_images
        from models.sampling import decode_tiles, generate_codes, sample_uniforms

        cfg, p = self.cfg, self.p
        lo, hi = item["lo"], item["hi"]
        h, w = p.grid
        raw, cond_ids = self._raw(item)
        codes_all, pngs = [], []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in range(lo, hi, cfg.batch_size):
                e = min(b + cfg.batch_size, hi)
                u = sample_uniforms(cfg.seed, range(b, e), h * w).to(self.device)
                codes = generate_codes(
                    self.gpt,
                    self.spec,
                    raw[b - lo : e - lo],
                    u,
                    cfg.options,
                    grid=p.grid,
                    tile=cfg.tile,
                    whole_batch=self.whole_batch,
                )
                x = decode_tiles(self.tokenizer, codes.reshape(-1, h, w), cfg.tile)
                pngs += encode_pngs(to_uint8_images(x), self.threads)
                codes_all.append(codes.cpu().numpy())
                done = e - lo
                log.info(
                    "sample: shard %d: %d/%d samples (%.1f images/s)",
                    shard,
                    done,
                    hi - lo,
                    done / max(time.perf_counter() - t0, 1e-9),
                )
        codes_np = np.concatenate(codes_all) if codes_all else np.zeros((0, h * w), np.int64)
        t = self._table(item, raw, cond_ids, codes_np, pngs)
        small = ["label", "split", "width", "height", "seed"]
        return self.out.write_shard(
            shard,
            {"data": t},
            {"read": hi - lo, "busy_ms": int(1000 * (time.perf_counter() - t0))},
            use_dictionary=small,
            write_statistics=["sample_index", *small],
            compression_level=3,
        )

    def _table(self, item, raw, cond_ids, codes: np.ndarray, pngs: list[bytes]) -> pa.Table:
        cfg, p = self.cfg, self.p
        idx = list(range(item["lo"], item["hi"]))
        n = len(idx)
        spatial = p.conditions is not None
        schema = schemas.with_metadata(schemas.generated_schema(codes.shape[1], spatial), self.metadata)
        height, width = p.size
        data = {
            "image_id": [image_id(self.out.identity, i) for i in idx],
            "image": pngs,
            "label": raw.tolist() if p.labels is not None else [None] * n,
            "split": [cfg.split] * n,
            "source_uri": [f"{p.model_uri}#seed={cfg.seed}&sample={i}" for i in idx],
            "width": [width] * n,
            "height": [height] * n,
            "codes": schemas.encode_codes(codes) if n else [],
            "sample_index": idx,
            "seed": [cfg.seed] * n,
        }
        if spatial:
            data["condition_image_id"] = cond_ids
        return pa.table(data, schema=schema)


def _grid(cfg: SampleConfig, p: Plan, out: stage.StageOutput, markers: list[ShardMarker]):
    """The logged preview: a row per class (or per condition, the condition decoded first)."""
    from infra.imaging import image_grid, png_to_array

    n = cfg.grid_samples
    cols = ["image", "label", "sample_index"] + (["condition_image_id"] if p.conditions else [])
    if p.labels is not None:
        want, per_row = min(len(set(p.labels)), MAX_GRID_ROWS), n
    elif p.conditions:
        want, per_row = min(len(p.conditions["rows"]), MAX_GRID_ROWS), n
    else:
        want, per_row = 1, n * n  # unconditional: one n x n block
    rows: dict[Any, list[np.ndarray]] = {}
    for m in markers:
        if len(rows) >= want and all(len(v) >= min(per_row, p.n) for v in rows.values()):
            break
        if not m.rows():
            continue
        t = storage.read_parquet(out.file_uri(m), cols)
        keys = [0] * t.num_rows
        if p.labels is not None:
            keys = t["label"].to_pylist()
        elif p.conditions:
            keys = t["condition_image_id"].to_pylist()
        for key, png in zip(keys, t["image"].to_pylist()):
            if key not in rows and len(rows) >= want:
                continue
            if len(rows.setdefault(key, [])) < per_row:
                rows[key].append(png_to_array(png))
    if not rows:
        return None
    images: list[np.ndarray] = []
    ncol = max(len(v) for v in rows.values()) if p.labels is not None else n
    if p.conditions:
        beside = _decoded_conditions(p, list(rows))
        ncol = n + (1 if beside is not None else 0)
        for k, ims in enumerate(rows.values()):
            row = ([beside[k]] if beside is not None else []) + ims
            images += row + [np.zeros_like(ims[0])] * (ncol - len(row))
    else:
        for key in sorted(rows, key=lambda v: (v is None, v)):
            ims = rows[key]
            images += ims + [np.zeros_like(ims[0])] * ((-len(ims)) % ncol)
    return image_grid(images, ncol)


def _decoded_conditions(p: Plan, image_ids: list[str]) -> list[np.ndarray] | None:
    """The conditions of ``image_ids`` decoded by the tokenizer that made them (colourised), or None
    (with a log line) when that tokenizer cannot be loaded."""
    import torch

    from infra.imaging import colorize, label_colors

    c = p.conditions
    try:
        tok = model_store.load_tokenizer(
            c["tokenizer_uri"], c["tokenizer_sha256"], f"the conditions {c['uri']}"
        )
    except (InputError, FileNotFoundError) as e:
        log.warning("sample: conditions not shown beside the samples: %s", e)
        return None
    # the grid shows the first conditions: read only those rows
    found = {iid: codes for iid, codes in _condition_rows(c, c["rows"][: 4 * MAX_GRID_ROWS]).values()}
    if not all(i in found for i in image_ids):
        log.warning("sample: conditions not shown beside the samples: rows not among the first conditions")
        return None
    codes = np.stack([found[i] for i in image_ids])
    side = int(round(c["length"] ** 0.5))
    with torch.no_grad():
        x = tok.model.decode_codes(torch.from_numpy(codes).reshape(-1, side, side)).float()
    if tok.model.config.segmentation_labels or x.shape[1] > 3:
        return [label_colors(v.argmax(0).numpy()) for v in x]
    return [colorize(v[0].numpy(), -1.0, 1.0) if v.shape[0] == 1 else v.numpy() for v in x]


def run(cfg: SampleConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Sample (or resume, or reuse) a generated dataset."""
    p, inputs, _, _ = plan(cfg)
    job = StageRun(STAGE, cfg, cfg.output_uri, inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    spec = p.spec
    names = spec.get("label_names")
    resolution = p.size[0] if p.size[0] == p.size[1] else None
    metadata = {
        "taming.label_names": json.dumps(names),
        "taming.channels": str(p.channels),
        "taming.resolution": str(resolution),
        "taming.identity": job.identity,
        "taming.generator_sha256": p.generator_sha256,
        "taming.tokenizer_sha256": p.tokenizer_sha256 or "",
    }
    items = _items(cfg, p)
    with job:
        tracking.set_tags(
            {
                "generator_sha256": p.generator_sha256,
                "generator_uri": p.model_uri,
                "condition": p.lineage["condition"],
            }
        )
        before = set(job.out.done_shards())  # shards a killed earlier attempt finished
        markers, reused = pool.map_items(
            SampleShards,
            (cfg, p, job.out, metadata),
            items,
            job.out,
            concurrency=cfg.concurrency,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
        )
        tally = stage.tally(STAGE, markers, expected=p.n)
        fresh = [m for m in markers if m.index not in before]
        new_rows = sum(m.rows() for m in fresh)
        busy = sum(m.counts.get("busy_ms", 0) for m in fresh) / 1000
        seconds = job.seconds
        counts = {"samples": tally["written"], "shards": len(markers), "reused_shards": reused}
        tokens = p.grid[0] * p.grid[1]
        figures = {
            "images_per_s": new_rows / max(seconds, 1e-9),
            "tokens_per_s": new_rows * tokens / max(seconds, 1e-9),
            # one actor's rate while it samples, decodes and encodes (start-up and writes excluded)
            "actor_images_per_s": new_rows / max(busy, 1e-9),
        }
        if (grid := _grid(cfg, p, job.out, markers)) is not None:
            tracking.log_image(grid, "samples/grid.png")
        label_counts = None
        if p.labels is not None:
            label_counts = {str(k): int(v) for k, v in zip(*np.unique(p.labels, return_counts=True))}
        return job.commit(
            markers,
            counts=counts,
            figures=figures,
            extra={
                "label_names": names,
                "channels": p.channels,
                "resolution": resolution,
                "image_size": list(p.size),
                "grid": list(p.grid),
                "codebook_size": spec["codebook_size"],
                "code_dtype": schemas.CODE_DTYPE,
                "generator": {**p.lineage, "uri": cfg.model_uri, "pinned_uri": p.model_uri, "spec": spec},
                "tokenizer_uri": p.tokenizer_uri,
                "tokenizer_sha256": p.tokenizer_sha256,
                "sampler": {**asdict(cfg.options), "seed": cfg.seed, "tile": cfg.tile},
                "conditions": None
                if p.conditions is None
                else {
                    "uri": p.conditions["uri"],
                    "column": p.conditions["column"],
                    "split": cfg.conditions_split,
                    "samples_per_condition": cfg.samples_per_condition,
                    "rows": len(p.conditions["rows"]),
                },
                "label_counts": label_counts,
            },
        )


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, SampleConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
