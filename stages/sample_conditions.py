"""The spatial conditions ``sample`` generates from, found before any work and read per shard.

``sample.conditions_uri`` names either
- code shards (``tokenize_images``) holding the generator's ``<condition>_codes`` column: the
  un-augmented rows (of ``conditions_split``) are the conditions, tokenized already; or
- image shards: the ``<condition>`` column an annotating stage wrote (``edges`` of your own
  photos, say), else the images themselves as the condition maps (``ingest`` a folder of maps:
  white edges on black, grey depth with bright = near, label ids as grey levels, or the small
  images to super-resolve). ``sample`` tokenizes them with the generator's condition tokenizer
  (``condition_tokenizer_uri`` overrides the one its training codes name; the sha256 must match).
  Low-resolution images are repeated up by the ``lowres`` factor the generator was trained with.
  Maps larger than the training size give a larger sampling grid (the sliding window, the
  condition window aligned with the image window): megapixel synthesis from a large map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from infra import code_shards, image_shards, model_store, previews, schemas, stage
from infra import config as config_lib
from infra.stage import InputError, InputRef
from models.net2net import GeneratorSpec

log = logging.getLogger(__name__)
MAP_CHANNELS = {"depth": 1, "segmentation": 1, "edges": 1}  # lowres: the tokenizer's (the images')


@dataclass(frozen=True)
class Maps:
    """Condition maps in image shards, tokenized while sampling."""

    column: str  # the image-shard column: the annotation (edges, depth...) or ``image``
    source: str  # the condition kind: depth, segmentation, edges, lowres
    channels: int
    upscale: int  # lowres images given small: each pixel repeated this many times per side
    size: tuple[int, int]  # (h, w) of the maps the tokenizer sees (after upscale)

    def decode(self, t) -> np.ndarray:
        """The compact arrays (N, C, H, W) the condition tokenizer encodes."""
        from infra.imaging import decode_column, maps_from_images

        values = image_shards.column_values(t, self.column)
        if self.column == "image":
            return maps_from_images(self.source, values, self.channels, self.upscale)
        return decode_column(self.source, values, self.channels)


@dataclass(frozen=True)
class Conditions:
    """Spatial conditions: the rows (file, row) of ``uri`` whose conditions the samples take."""

    uri: str
    files: tuple[stage.FileEntry, ...]
    column: str  # code shards: the code column; image shards: the map column
    length: int  # condition tokens per sample
    rows: tuple[tuple[int, int], ...]
    tokenizer_uri: str
    tokenizer_sha256: str
    split: str | None  # the split the rows come from (None: all)
    maps: Maps | None = None  # image shards: the maps, tokenized while sampling

    def first(self, n: int) -> Conditions:
        return replace(self, rows=self.rows[:n])


def find(cfg, spec: GeneratorSpec) -> tuple[Conditions, InputRef, tuple[int, int] | None]:
    """The conditions ``cfg.conditions_uri`` holds, checked against the generator, and the sampling
    grid condition maps ask for (None: code shards, the grid is ``sample.grid``'s)."""
    if not cfg.conditions_uri:
        raise config_lib.ConfigError(
            "sample.conditions_uri: a spatially conditioned generator needs its conditions: code shards "
            "with its condition codes, or image shards of condition maps"
        )
    m = stage.read_manifest(cfg.conditions_uri)
    kind = (m.dataset or {}).get("kind")
    if kind in image_shards.KINDS:
        return _maps(cfg, spec, m)
    found = _codes(cfg, spec, m)
    return found, InputRef.output("conditions", m), None


def check_length(c: Conditions, spec: GeneratorSpec, grid: tuple[int, int], what: str) -> None:
    """The condition covers the sampling grid: the training prefix, or the whole larger grid."""
    want = spec.prefix_length if tuple(grid) == tuple(spec.grid) else grid[0] * grid[1]
    if c.length != want:
        raise InputError(
            f"sample.conditions_uri: {what} give {c.length} condition codes, the generator needs {want} "
            f"(for a {grid[0]}x{grid[1]} grid{'' if want == spec.prefix_length else ', sliding window'})"
        )


def _split_files(cfg, m: stage.Manifest) -> tuple[str | None, list[stage.FileEntry]]:
    """The split ``conditions_split`` names (``held-out``: val, else test) and its data files."""
    split = stage.held_out_split(m) if cfg.conditions_split == "held-out" else cfg.conditions_split
    return split, m.data_files(split)


def _codes(cfg, spec: GeneratorSpec, m: stage.Manifest) -> Conditions:
    codes = code_shards.describe(m)
    present = sorted(codes.conditions)
    column = spec.condition_column or (present[0] if len(present) == 1 else None)
    if column is None or column not in codes.conditions:
        raise InputError(
            f"sample.conditions_uri: {cfg.conditions_uri} has no `{spec.condition_column or 'condition'}` "
            f"column (it holds {present or 'no condition codes'})"
        )
    cc = codes.conditions[column]
    if cc.codebook_size != spec.condition.cond_codebook_size:
        raise InputError(
            f"sample.conditions_uri: `{column}` of {cfg.conditions_uri} has a codebook of {cc.codebook_size} "
            f"codes; the generator was trained on {spec.condition.cond_codebook_size}"
        )
    want_sha = spec.condition_tokenizer_sha256
    if want_sha and want_sha != cc.tokenizer_sha256:
        raise InputError(
            f"sample.conditions_uri: `{column}` of {cfg.conditions_uri} was made by the tokenizer with "
            f"sha256 {cc.tokenizer_sha256}, the generator was trained on codes of sha256 {want_sha}"
        )
    m.check_sizes()
    split, files = _split_files(cfg, m)
    rows = code_shards.unaugmented_rows(m.output_uri, files)
    _some(cfg, rows, split)
    return Conditions(
        m.output_uri,
        tuple(files),
        column,
        cc.length,
        tuple(rows),
        cc.tokenizer_uri,
        cc.tokenizer_sha256,
        split,
    )


def _some(cfg, rows, split) -> None:
    if not rows:
        raise InputError(
            f"sample.conditions_uri: {cfg.conditions_uri} has no condition rows"
            + (f" in split {split!r}" if split else "")
        )


def _maps(cfg, spec: GeneratorSpec, m: stage.Manifest) -> tuple[Conditions, InputRef, tuple[int, int]]:
    source = code_shards.CONDITION_SOURCES.get(spec.condition_column or "")
    if source is None:
        raise InputError(
            f"sample.conditions_uri: the generator records no condition column ({spec.condition_column})"
        )
    d = image_shards.describe(m)
    column = source if source in d.annotations else "image"
    uri = cfg.condition_tokenizer_uri or spec.condition_tokenizer_uri
    if not uri:
        raise config_lib.ConfigError(
            f"sample.condition_tokenizer_uri: {cfg.model_uri} records no {source} tokenizer to tokenize the "
            f"maps of {cfg.conditions_uri}; name it (sha256 {spec.condition_tokenizer_sha256})"
        )
    header = model_store.describe_tokenizer(
        uri,
        spec.condition_tokenizer_sha256,
        f"the condition codes of {cfg.model_uri}",
        "condition_tokenizer_uri",
    )
    tok = header.config
    if tok.codebook_size != spec.condition.cond_codebook_size:
        raise InputError(
            f"sample.condition_tokenizer_uri: {uri} has a codebook of {tok.codebook_size} codes; the "
            f"generator was trained on {spec.condition.cond_codebook_size}"
        )
    upscale = 1
    channels = tok.in_channels if source == "lowres" else MAP_CHANNELS[source]
    if (column == "image" or source == "lowres") and d.channels != channels:
        raise InputError(
            f"sample.conditions_uri: {cfg.conditions_uri} holds {d.channels}-channel images; {source} maps "
            f"for this generator have {channels} (ingest them with channels: {channels})"
        )
    if column == "image":
        if source == "lowres":
            upscale = int((spec.condition_params or {}).get("factor", 0))
            if upscale < 1:
                raise InputError(
                    f"sample.conditions_uri: {cfg.model_uri} records no lowres factor to enlarge the images "
                    f"of {cfg.conditions_uri} by; give the output of the lowres stage instead"
                )
    h, w = d.size[0] * upscale, d.size[1] * upscale
    f = tok.downsample_factor
    if h % f or w % f:
        raise InputError(
            f"sample.conditions_uri: {d.size[0]}x{d.size[1]} maps"
            + (f" (x{upscale}: {h}x{w})" if upscale > 1 else "")
            + f" are not a multiple of the {source} tokenizer's downsampling factor {f}"
        )
    grid = _grid_of_maps(cfg, spec, (h // f, w // f), (h, w))
    m.check_sizes()
    split, files = _split_files(cfg, m)
    rows = [(fi, r) for fi, entry in enumerate(files) for r in range(entry.rows)]
    _some(cfg, rows, split)
    found = Conditions(
        m.output_uri,
        tuple(files),
        column,
        (h // f) * (w // f),
        tuple(rows),
        uri,
        header.sha256,
        split,
        Maps(column, source, channels, upscale, (h, w)),
    )
    return found, InputRef.output("conditions", m), grid


def _grid_of_maps(cfg, spec: GeneratorSpec, cond: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The sampling grid maps of ``size`` (condition grid ``cond``) give: the training grid when
    they are the training size, else the condition grid itself (the windows aligned)."""
    g = tuple(spec.grid)
    if cond[0] * cond[1] == spec.prefix_length and (cfg.grid is None or tuple(cfg.grid) == g):
        grid = g
    elif spec.prefix_length != g[0] * g[1]:
        raise InputError(
            f"sample.conditions_uri: {size[0]}x{size[1]} maps give a {cond[0]}x{cond[1]} condition grid; the "
            f"generator takes {spec.prefix_length} condition codes and cannot slide its condition window "
            f"(its condition grid differs from its {g[0]}x{g[1]} image grid)"
        )
    else:
        grid = cond
    if cfg.grid is not None and tuple(cfg.grid) != tuple(grid):
        raise InputError(
            f"sample.grid {list(cfg.grid)}: the {size[0]}x{size[1]} condition maps fix the grid at "
            f"{list(grid)}; leave sample.grid unset"
        )
    return grid


class Reader:
    """In a sampling actor: the condition codes of a shard's rows (reading code shards, or reading
    and tokenizing condition maps with the condition tokenizer, loaded once)."""

    def __init__(self, c: Conditions, device, dtype):
        self.c, self.device, self.dtype, self.tokenizer = c, device, dtype, None
        if c.maps is not None:
            model = model_store.load_first_stage(c.tokenizer_uri, c.tokenizer_sha256).model
            self.tokenizer = model.to(device, dtype).eval()

    def read(self, rows: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[str, np.ndarray]]:
        """(file, row) -> (image_id, condition codes (length,))."""
        from infra.devices import auto_batch_size
        from models.vqgan import encode_batches

        c = self.c
        if c.maps is None:
            return code_shards.read_rows(c.uri, c.files, rows, c.column, c.length)
        unique = list(dict.fromkeys(tuple(r) for r in rows))
        t = stage.read_rows(c.uri, c.files, unique, ["image_id", c.column])
        x = c.maps.decode(t)
        bs = auto_batch_size(*c.maps.size, str(self.device))
        codes = encode_batches(
            self.tokenizer, x, bs, self.device, self.dtype, c.maps.source == "segmentation"
        )
        codes = codes.reshape(len(unique), -1)
        return {r: (iid, v) for r, iid, v in zip(unique, t["image_id"].to_pylist(), codes)}


# --------------------------------------------------------------------------- the sample grid


def beside(c: Conditions, image_ids: list[str]) -> tuple[list | None, list | None]:
    """The conditions of ``image_ids`` as pictures and the real images they came from: condition
    maps as given (the real image when an annotating stage made them), code shards' conditions as
    their annotating stage wrote them (through the code shards' lineage), else decoded by their
    tokenizer with no real image."""
    from infra.imaging import png_to_array

    if c.maps is not None:
        columns = ["image", c.column] if c.column != "image" else ["image"]
        t = image_shards.rows_by_id(c.uri, image_ids, columns)
        values = image_shards.column_values(t, c.column)
        if c.column == "image":
            return [_picture(v, c.maps) for v in c.maps.decode(t)], None
        return previews.conditions(c.column, values), [
            png_to_array(b) for b in schemas.image_bytes(t["image"])
        ]
    try:
        source = code_shards.images_uri(stage.read_manifest(c.uri))
        column = code_shards.CONDITION_SOURCES[c.column]
        if source is None:
            raise InputError(f"{c.uri} records no image shards")
        t = image_shards.rows_by_id(source, image_ids, ["image", column])
    except (InputError, FileNotFoundError) as e:
        log.info("sample: the grid shows decoded condition codes (%s)", e)
        return _decoded(c, image_ids), None
    real = [png_to_array(b) for b in schemas.image_bytes(t["image"])]
    return previews.conditions(column, image_shards.column_values(t, column)), real


def _picture(x: np.ndarray, maps: Maps) -> np.ndarray:
    """One decoded map (C, H, W) as a picture."""
    from infra.imaging import colorize, label_colors

    if maps.source == "segmentation":
        return label_colors(x[0])
    if maps.source == "depth":
        return colorize(x[0], -1.0, 1.0)
    u8 = np.rint((x + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
    return u8[..., 0] if u8.shape[-1] == 1 else u8


def _decoded(c: Conditions, image_ids: list[str]) -> list[np.ndarray] | None:
    """The conditions of ``image_ids`` decoded by the tokenizer that made them, or None (with a log
    line) when that tokenizer cannot be loaded."""
    import torch

    try:
        tok = model_store.load_first_stage(c.tokenizer_uri, c.tokenizer_sha256).model
    except (InputError, FileNotFoundError) as e:
        log.warning("sample: conditions not shown beside the samples: %s", e)
        return None
    # the grid shows the first conditions: read only those rows
    first = code_shards.read_rows(c.uri, c.files, c.rows[: 4 * previews.MAX_GRID_ROWS], c.column, c.length)
    found = dict(first.values())
    if not all(i in found for i in image_ids):
        log.warning("sample: conditions not shown beside the samples: rows not among the first conditions")
        return None
    codes = np.stack([found[i] for i in image_ids])
    side = int(round(c.length**0.5))
    with torch.no_grad():
        x = tok.decode_codes(torch.from_numpy(codes).reshape(-1, side, side)).float()
    return previews.decoded_conditions(x)


def items(c: Conditions, lo: int, hi: int, per: int) -> dict[str, Any]:
    """A shard's share of the conditions: samples [lo, hi), ``per`` of each condition."""
    return {"cond_lo": lo // per, "cond_rows": [list(r) for r in c.rows[lo // per : -(-hi // per)]]}
