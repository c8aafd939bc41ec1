"""Train the transformer on code shards with Ray Train: the second stage of *Taming Transformers*.

The model learns from the codes the tokenize stage wrote (and their condition codes), never from
pixels: no tokenizer encoder is loaded. The condition becomes a token prefix, as in the paper:
``unconditional`` (one start token), ``class`` (the ``label`` column), ``depth`` / ``segmentation`` /
``edges`` / ``lowres`` (the ``<name>_codes`` column, a spatial prefix), ``coord`` (taming's
coordinate condition for aligned data: each code cell's position in the full image, quantised to
``coord_levels``). Native models give the condition its own token ids after the image codes, and a
null token when ``cond_dropout`` > 0 (classifier-free guidance; default 0.1 for class conditions).

The recipe (``recipe``, ``models.gpt_training.GPTRecipe``): AdamW (betas 0.9/0.95, weight decay on
matmul weights only), warm-up + cosine decay, clipping, optional EMA, token corruption (``pkeep``)
and dropout, bf16 autocast on GPU; gradients all-reduced across ``resources.workers`` (gloo on CPU,
NCCL on GPU), data fed through Ray Data in a seeded, resumable order. Checkpoints every
``checkpoint_every`` steps; a killed worker or a resubmitted job resumes from the newest complete
one. Rank 0 logs train/loss (nats), train/bits_per_token, the learning rate, the gradient norm and
tokens/s, val/bits_per_token on the held-out split every ``val_every`` steps, and every
``sample_every`` steps a grid of samples (rows: classes or held-out conditions) decoded by the
tokenizer the code shards name (its sha256 verified).

``attention``: ``full`` (the official model), or local attention over the code grid (``local2d``,
the Image Transformer's query blocks of ``block_h x block_w`` codes with a memory of
``flange_top`` rows above and ``flange_left`` / ``flange_right`` columns beside; ``local1d``, query
blocks of ``block_w`` codes of the raster sequence with ``flange_left`` codes before): a layer's
cost grows linearly with the grid and the model samples grids larger than it was trained on in
one pass (``sample.grid``). Local attention takes a one-token condition (unconditional, class).

``objective``: ``autoregressive`` (the raster prior above) or ``masked``, MaskGIT's bidirectional
prior on the same codes (``models.maskgit``): trained on cosine-masked rows, sampled in
``sample.sampler.steps`` parallel passes (its training grid only); its validation figure is bits
per masked code with half of every row masked (no exact likelihood: not comparable with the
raster prior's bits/token).

The result is one native checkpoint carrying the GPT and everything sampling needs
(``models.net2net.GeneratorSpec``), registered as ``models:/<register_name>@<register_alias>``;
``infra.model_store.load_generator`` loads it (or an official ``Net2NetTransformer`` release).

    python -m stages.train_gpt codes_uri=... output_uri=... condition=class preset=gpt-demo \\
        steps=1000 batch_size=64 recipe.lr=4e-3 resources.workers=2 register_name=demo-gpt
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from infra import code_shards, model_store, previews, ray_train, stage, tracking
from infra import config as config_lib
from infra.code_shards import CodeShards
from infra.config import added_field, execution_field, input_field, output_field
from infra.devices import Resources
from infra.stage import InputError, InputRef, StageResult, StageRun
from models.gpt import GPTConfig
from models.gpt_training import GPTRecipe
from models.net2net import GeneratorSpec

log = logging.getLogger(__name__)
STAGE = "train_gpt"
HEADLINE = ("steps", "val/bits_per_token")  # the figures a pipeline's summary shows for this stage
Condition = Literal["unconditional", "class", "depth", "segmentation", "edges", "lowres", "coord"]
SPATIAL = {source: col for col, source in code_shards.CONDITION_SOURCES.items()}  # depth -> depth_codes
WINDOW_FIELDS = ("block_h", "block_w", "flange_top", "flange_left", "flange_right")


@dataclass(frozen=True)
class TrainGPTConfig:
    codes_uri: str = input_field()  # committed code shards ("" = the pipeline's tokenize output)
    output_uri: str = output_field()  # checkpoints and the final model ("" = derived from run.root_uri)
    # what the prefix holds: class, unconditional, depth, segmentation, edges, lowres, coord
    condition: Condition = "class"
    cond_dropout: float | None = None  # share of rows trained with the null condition; None: 0.1 for class
    coord_levels: int = 255  # coord: quantisation levels of the position (taming's CoordStage n_embed)
    preset: str = "gpt-demo"  # models.gpt.PRESETS: layers, heads, width (vocabulary and context derived)
    n_layer: int | None = None  # override the preset's
    n_head: int | None = None  # override the preset's
    n_embd: int | None = None  # override the preset's
    vocab_size: int | None = None  # None: codebook + condition tokens (+ null); at least that
    block_size: int | None = None  # None: condition length + grid - 1; at least that
    attention: Literal["full", "local1d", "local2d"] = added_field("full")  # full causal, or a local window
    # autoregressive: the raster prior (one code per pass); masked: MaskGIT's bidirectional prior,
    # decoded in sampler.steps parallel passes (models.maskgit)
    objective: Literal["autoregressive", "masked"] = added_field("autoregressive")
    block_h: int = added_field(8)  # local2d: query blocks of block_h x block_w codes; local1d: block_w codes
    block_w: int = added_field(8)  # local attention: the query block's width in codes
    flange_top: int = added_field(4)  # local2d: memory rows above a query block
    flange_left: int = added_field(4)  # memory columns left of it (local1d: codes before it)
    flange_right: int = added_field(4)  # local2d: memory columns right of it
    dropout: float = 0.0  # embedding, residual and attention dropout
    steps: int = 1000  # optimizer steps (the training budget)
    batch_size: int = 64  # global, split over the workers
    # AdamW (lr None: 4e-3 * 128 / n_embd), warm-up + cosine, weight decay, clipping, EMA, pkeep:
    # models.gpt_training.GPTRecipe
    recipe: GPTRecipe = field(default_factory=GPTRecipe)
    seed: int = 0  # initialisation, data order, condition dropout
    shuffle_buffer: int = 4096  # rows each worker shuffles within, per epoch (0: shard order only)
    tokenizer_uri: str | None = input_field(None)  # for sample grids; None: the one the codes name
    # the model committed (and registered) is the one of the best validation, the final one or an
    # earlier (val_every); patience: stop after this many validations without a better one (None: never)
    keep_best: bool = added_field(True)
    patience: int | None = added_field(None)  # stop after this many validations without a better one
    register_name: str | None = None  # register the final model under this name ...
    register_alias: str = "candidate"  # ... with this alias
    # execution only (not part of the identity)
    resources: Resources = execution_field(default_factory=lambda: Resources(workers=2))  # Ray Train workers
    bf16: bool = execution_field(True)  # autocast on GPU
    checkpoint_every: int = execution_field(250)  # steps between resumable checkpoints
    log_every: int = execution_field(25)  # steps between logged metrics and progress lines
    val_every: int = execution_field(250)  # rank 0, on the held-out split; 0: only at the end
    sample_every: int = execution_field(500)  # a decoded sample grid; 0: none (no tokenizer needed)
    samples_per_condition: int = execution_field(8)  # columns of the logged sample grid
    max_failures: int = execution_field(
        2
    )  # worker failures Ray Train recovers from (from the last checkpoint)
    val_rows: int = execution_field(10_000)  # cap on the held-out rows

    def __post_init__(self):
        from models.gpt import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; known: {sorted(PRESETS)}")
        if self.cond_dropout is not None and not 0 <= self.cond_dropout < 1:
            raise ValueError("cond_dropout must lie in [0, 1)")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if self.patience is not None and (self.patience < 1 or not self.val_every):
            raise ValueError("patience must be >= 1 and needs val_every > 0 (it counts validations)")

    @property
    def dropout_rate(self) -> float:
        if self.cond_dropout is not None:
            return self.cond_dropout
        return 0.1 if self.condition == "class" else 0.0


@dataclass(frozen=True)
class TrainGPTPlan:
    """What the driver worked out before any work: the model, its spec and how to read the rows."""

    inputs: tuple[InputRef, ...]  # the code shards, by identity
    codes: CodeShards  # their descriptor
    spec: GeneratorSpec
    gpt: GPTConfig
    recipe: GPTRecipe  # its lr resolved
    raw: str  # the batch column the condition prefix comes from
    columns: tuple[str, ...]  # condition code columns to read
    labels: tuple[int, ...] | None  # class: the label ids trained on (rows without one are skipped)
    train_rows: int

    def summary(self, cfg: TrainGPTConfig) -> str:
        g, (h, w) = self.gpt, self.spec.grid
        return (
            f"{self.train_rows:,} train rows of {h}x{w} codes ({cfg.condition}) -> "
            f"{'masked (bidirectional)' if cfg.objective == 'masked' else 'GPT'} "
            f"{g.n_layer}x{g.n_embd} ({g.attention}, vocab {g.vocab_size}), {cfg.steps} steps x "
            f"{cfg.batch_size} on {cfg.resources.describe()}"
        )

    def derive(self, cfg: TrainGPTConfig):
        """The rows' computed condition column (coord), or None."""
        if self.raw != "coord":
            return None
        return functools.partial(code_shards.coord_column, codes=self.codes, levels=cfg.coord_levels)


def plan(cfg: TrainGPTConfig) -> TrainGPTPlan:
    """Check the input against the config and derive the model; every problem fails here, by name."""
    from models.gpt import PRESETS
    from models.net2net import native_condition

    if not cfg.codes_uri:
        raise config_lib.ConfigError("train_gpt.codes_uri is not set")
    m = stage.read_manifest(cfg.codes_uri)  # NotCommittedError names the problem
    m.check_sizes()
    codes = code_shards.describe(m)  # InputError for outputs that are not code shards
    k, grid = codes.codebook_size, codes.grid
    n_train, keep, fields, raw, columns, prefix = m.rows("train"), None, {}, "codes", (), 1
    if cfg.condition == "class":
        labels = stage.read_committed_table(
            cfg.codes_uri, ["label"], "train", verify=False
        )  # verified in run
        labels = code_shards.labels_of(labels)
        if not (labels >= 0).any():
            raise InputError(f"train_gpt.condition=class: {cfg.codes_uri} has no labels in its train split")
        n_classes = len(codes.label_names) if codes.label_names else int(labels.max()) + 1
        fields["n_classes"] = n_classes
        raw, keep, n_train = "label", tuple(range(n_classes)), int((labels >= 0).sum())
    elif cfg.condition in SPATIAL:
        col = SPATIAL[cfg.condition]
        if col not in codes.conditions:
            raise InputError(
                f"train_gpt.condition={cfg.condition}: {cfg.codes_uri} has no `{col}` column (tokenize with "
                f"tokenize_images.{cfg.condition}_tokenizer_uri set)"
            )
        fields["cond_codebook_size"] = codes.conditions[col].codebook_size
        raw, columns, prefix = col, (col,), codes.conditions[col].length
    elif cfg.condition == "coord":
        if codes.image_size[0] != codes.image_size[1]:
            raise InputError(f"train_gpt.condition=coord: the images behind {cfg.codes_uri} are not square")
        fields["coord_levels"] = cfg.coord_levels
        raw, prefix = "coord", grid[0] * grid[1]
    cond, vocab = native_condition(
        "spatial" if cfg.condition in SPATIAL else cfg.condition, k, cfg.dropout_rate, **fields
    )
    spec = GeneratorSpec(
        condition=cond,
        codebook_size=k,
        grid=grid,
        tokenizer_uri=cfg.tokenizer_uri or codes.tokenizer_uri,
        tokenizer_sha256=codes.tokenizer_sha256,
        label_names=codes.label_names,
        prefix_length=prefix,
        condition_column=columns[0] if columns else None,
        condition_tokenizer_sha256=codes.conditions[columns[0]].tokenizer_sha256 if columns else None,
        condition_tokenizer_uri=codes.conditions[columns[0]].tokenizer_uri if columns else None,
        condition_params=code_shards.condition_params(m, columns[0]) if columns else None,
        objective=cfg.objective,
    )
    masked = cfg.objective == "masked"
    if masked and (cfg.attention != "full" or cfg.condition == "coord"):
        raise config_lib.ConfigError(
            "train_gpt.objective=masked takes full attention and a class, unconditional or spatial "
            f"condition (not attention={cfg.attention}, condition={cfg.condition})"
        )
    if masked:
        vocab += 1  # the [MASK] token, the vocabulary's last id
    if cfg.vocab_size is not None and cfg.vocab_size < vocab:
        raise InputError(
            f"train_gpt.vocab_size={cfg.vocab_size} is below what the codes need: codebook of {k} codes + "
            f"{vocab - k} condition{' and mask' if masked else ''} tokens = {vocab}"
        )
    if cfg.block_size is not None and cfg.block_size < spec.block_size:
        raise InputError(
            f"train_gpt.block_size={cfg.block_size} is too short for a {grid[0]}x{grid[1]} grid: {prefix} "
            f"condition tokens + {grid[0] * grid[1]} image tokens{'' if masked else ' - 1'} = "
            f"{spec.block_size}"
        )
    base = PRESETS[cfg.preset]
    window = {}
    if cfg.attention != "full":  # the local window's geometry, on the codes' grid
        if prefix != 1:
            raise config_lib.ConfigError(
                f"train_gpt.attention={cfg.attention} takes a one-token condition (unconditional, class): "
                f"condition={cfg.condition} is a prefix of {prefix} tokens that every position would "
                "attend to"
            )
        window = {f: getattr(cfg, f) for f in WINDOW_FIELDS}
        window.update(attention=cfg.attention, grid_h=grid[0], grid_w=grid[1], n_prefix=prefix)
    try:
        gpt = dataclasses.replace(
            base,
            vocab_size=cfg.vocab_size or vocab,
            block_size=cfg.block_size or spec.block_size,
            n_layer=cfg.n_layer or base.n_layer,
            n_head=cfg.n_head or base.n_head,
            n_embd=cfg.n_embd or base.n_embd,
            embd_pdrop=cfg.dropout,
            resid_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bidirectional=masked,
            **window,
        )
    except ValueError as e:  # a window that does not tile the code grid
        raise config_lib.ConfigError(f"train_gpt: {e} (the codes' grid)") from None
    if gpt.n_embd % gpt.n_head:
        raise config_lib.ConfigError(
            f"train_gpt: n_embd={gpt.n_embd} is not a multiple of n_head={gpt.n_head}"
        )
    ray_train.check_batch(STAGE, cfg.codes_uri, n_train, "rows", cfg.batch_size, cfg.resources.workers or 1)
    if cfg.sample_every:  # sample grids: the tokenizer the codes name, its sha256 checked (not loaded)
        model_store.describe_tokenizer(
            spec.tokenizer_uri, spec.tokenizer_sha256, f"the code shards {cfg.codes_uri}"
        )
    recipe = dataclasses.replace(cfg.recipe, lr=cfg.recipe.peak_lr(gpt.n_embd))
    inputs = (InputRef.output("codes", m),)
    return TrainGPTPlan(inputs, codes, spec, gpt, recipe, raw, columns, keep, n_train)


MASK_RATIO = 0.5  # a masked prior's validation figure: bits per masked code, half of every row masked


def val_bits(model, spec: GeneratorSpec, prefix, codes, autocast=None) -> float:
    """The validation figure: bits per image code given the condition and the codes before it
    (raster), or bits per masked code with half of every row masked, the same masks every time
    (masked: a masked prior has no exact likelihood; the two figures are not comparable)."""
    from models.gpt_training import bits_per_token, masked_bits

    if spec.objective == "masked":
        return masked_bits(model, prefix, codes, spec.codebook_size, MASK_RATIO, autocast_dtype=autocast)
    return bits_per_token(model, prefix, codes, autocast_dtype=autocast)


def held_out(cfg: TrainGPTConfig, p: TrainGPTPlan) -> tuple[Any, Any, str]:
    """The held-out rows as (raw condition, codes, split name)."""
    import torch

    t, split = stage.read_held_out(cfg.codes_uri, [*code_shards.COLUMNS, *p.columns], None)
    if p.labels is not None:
        t = t.filter(np.isin(code_shards.labels_of(t), p.labels))
    t = t.slice(0, cfg.val_rows)
    rows = code_shards.decode_rows(t, p.codes.num_tokens)
    if (derive := p.derive(cfg)) is not None:
        rows.update(derive(t))
    return torch.from_numpy(rows[p.raw]), torch.from_numpy(rows["codes"]), split


def sample_grid(cfg: TrainGPTConfig, model, spec, raw_held, tokenizer, seed: int) -> np.ndarray:
    """Samples decoded by the tokenizer, one row per class (or held-out condition),
    ``samples_per_condition`` columns; drawn as the sample stage draws (``models.sampling``)."""
    import torch

    from infra.imaging import to_uint8_images
    from models.sampling import SamplerOptions, decode_tiles, generate_codes, sample_uniforms, uniforms_needed

    n, cond, (h, w) = cfg.samples_per_condition, spec.condition, spec.grid
    if cond.mode == "class":
        raw = torch.arange(min(cond.n_classes, previews.MAX_GRID_ROWS)).repeat_interleave(n)
    elif cond.mode == "unconditional":
        raw = torch.zeros(n * n, dtype=torch.long)
    else:
        raw = raw_held[: min(previews.MAX_GRID_ROWS, len(raw_held))].repeat_interleave(n, 0)
    options = SamplerOptions()
    u = sample_uniforms(seed, range(len(raw)), uniforms_needed(spec, options))
    codes = generate_codes(model, spec, raw, u, options)
    x = decode_tiles(tokenizer.to(next(model.parameters()).device), codes.reshape(-1, h, w))
    images = to_uint8_images(x)
    groups = {r: images[r * n : (r + 1) * n] for r in range(len(images) // n)}
    names = list(spec.label_names or []) if cond.mode == "class" else []
    shown = [names[r] if r < len(names) else str(r) for r in groups] if names else None
    return previews.rows(groups, n, names=shown)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: the GPT loop (scaffolding: ``infra.ray_train.Session``)."""
    import torch

    from models.gpt import GPT
    from models.gpt_training import GPTTrainer, step_generator
    from models.net2net import condition_prefix, drop_condition

    cfg: TrainGPTConfig = config["cfg"]
    p: TrainGPTPlan = config["plan"]
    session = ray_train.Session(config)
    torch.manual_seed(cfg.seed)  # same init everywhere
    autocast = session.place.dtype if session.place.dtype != torch.float32 else None
    model = GPT(p.gpt).to(session.device)
    trainer = GPTTrainer(
        model, p.recipe, p.spec.codebook_size, cfg.steps, autocast_dtype=autocast, objective=cfg.objective
    )
    if (state := session.restore()) is not None:
        trainer.load_state_dict(state)
    gen = torch.Generator()
    held, tokenizer = None, None
    cond = p.spec.condition
    # the best validation so far (rank 0: {"bits", "step", "weights"}) and validations since it
    best, stale = (state.get("best"), int(state.get("stale", 0))) if state else (None, 0)
    with session.tracking():
        for batch in session.batches("train", max(1, cfg.batch_size // session.world)):
            step_generator(gen, cfg.seed, session.rank, trainer.step)
            prefix = drop_condition(cond, condition_prefix(cond, batch[p.raw]), gen)
            logs = trainer.train_step(prefix, batch["codes"], gen)
            step, last = trainer.step, trainer.step >= cfg.steps
            session.count(batch["codes"].numel())
            if step % cfg.log_every == 0:
                metrics = {f"train/{k}": v for k, v in logs.items()}
                session.log_metrics({**metrics, "train/tokens_per_s": session.items_per_s()}, step=step)
            if cfg.val_every and step % cfg.val_every == 0 and not last:
                stop = False
                if session.is_chief:
                    held = held or held_out(cfg, p)
                    prefix = condition_prefix(cond, held[0])
                    bits = val_bits(trainer.eval_model(), p.spec, prefix, held[1], autocast)
                    session.log_metrics({"val/bits_per_token": bits}, step=step)
                    if best is None or bits < best["bits"]:
                        weights = {
                            k: v.detach().cpu().clone() for k, v in trainer.eval_model().state_dict().items()
                        }
                        best, stale = {"bits": bits, "step": step, "weights": weights}, 0
                    else:
                        stale += 1
                    stop = cfg.patience is not None and stale >= cfg.patience
                if cfg.patience is not None and session.agree(stop):
                    if session.is_chief:
                        log.info(
                            "train_gpt: stopping early at step %d: no better validation in %d checks (best: "
                            "%.4f bits/token at step %d)",
                            step,
                            stale,
                            best["bits"],
                            best["step"],
                        )
                    last = True
            if session.is_chief and cfg.sample_every and (step % cfg.sample_every == 0 or last):
                held = held or held_out(cfg, p)
                tokenizer = tokenizer or model_store.load_tokenizer(
                    p.spec.tokenizer_uri, p.spec.tokenizer_sha256
                )
                grid = sample_grid(cfg, trainer.eval_model(), p.spec, held[0], tokenizer, step)
                session.log_image(grid, f"samples/step_{step:07d}.png")
            if step % cfg.checkpoint_every == 0 or last:
                session.report(
                    step, {"loss": logs["loss"]}, {**trainer.state_dict(), "best": best, "stale": stale}
                )
            if last:
                break


def run(cfg: TrainGPTConfig, experiment: str = tracking.DEFAULT_EXPERIMENT) -> StageResult:
    """Train (or resume, or reuse) the transformer."""
    import torch

    from models.gpt import GPT, num_params
    from models.net2net import condition_prefix

    p = plan(cfg)
    job = StageRun(STAGE, cfg, p.inputs, experiment)
    if (done := job.cached()) is not None:
        return done
    log.info("train_gpt: %s", p.summary(cfg))
    stage.read_manifest(cfg.codes_uri).verify("train")  # what Ray Data reads next, checked first
    with job:
        tracking.set_tags(
            {
                "condition": cfg.condition,
                "objective": cfg.objective,
                "tokenizer_sha256": p.spec.tokenizer_sha256 or "",
            }
        )
        train = code_shards.ray_dataset(
            cfg.codes_uri,
            split="train",
            labels=p.labels,
            seed=cfg.seed,
            columns=p.columns,
            derive=p.derive(cfg),
        )
        state = ray_train.fit(job, train_loop, {"cfg": cfg, "plan": p}, {"train": train}, cfg)
        train_seconds = job.seconds
        model = GPT(p.gpt)
        model.load_state_dict(state["ema"] if state.get("ema") else state["model"])
        raw, held_codes, split = held_out(cfg, p)
        bits = val_bits(model.eval(), p.spec, condition_prefix(p.spec.condition, raw), held_codes)
        final_bits, kept_step, best = bits, int(state["step"]), state.get("best")
        if cfg.keep_best and best is not None and best["bits"] < bits:  # an earlier model validated better
            model.load_state_dict(best["weights"])
            bits, kept_step = float(best["bits"]), int(best["step"])
            log.info(
                "train_gpt: keeping the model of step %d (%.4f bits/token on %s) over the final one (%.4f)",
                kept_step,
                bits,
                split,
                final_bits,
            )
        counts_ = np.bincount(held_codes.reshape(-1).numpy(), minlength=p.spec.codebook_size)
        freq = counts_[counts_ > 0] / counts_.sum()
        unigram = float(-(freq * np.log2(freq)).sum())
        if bits > unigram:
            log.warning(
                "train_gpt: validation %.3f bits/token is worse than the unigram baseline %.3f (code "
                "frequencies alone): the model has learned the training rows, not the data (%d train rows); "
                "use more data, fewer steps, dropout or patience",
                bits,
                unigram,
                p.train_rows,
            )
            tracking.set_tags({"warning": "validation worse than the unigram baseline (overfit)"})
        figures = {
            "val/bits_per_token": bits,
            "val/loss": bits * float(np.log(2)),
            "val/final_bits_per_token": final_bits,
            "val/kept_step": kept_step,
            "val/unigram_bits_per_token": unigram,
            **({"val/mask_ratio": MASK_RATIO} if cfg.objective == "masked" else {}),
            "val/rows": int(len(held_codes)),
            "params": num_params(model),
            "train_seconds": train_seconds,
        }
        tracking.set_tags({"val/split": split})
        step = int(state["step"])
        workers = cfg.resources.workers or 1
        tokens = step * (cfg.batch_size // workers) * workers * held_codes.shape[1]
        with torch.no_grad():
            return ray_train.commit_model(
                job,
                model,
                counts={"steps": step, "train_rows": p.train_rows, "tokens": tokens},
                figures=figures,
                extra={
                    "stage": STAGE,
                    "step": step,
                    "kept_step": kept_step,
                    "generator": p.spec.to_dict(),
                    "recipe": dataclasses.asdict(p.recipe),
                },
                register_name=cfg.register_name,
                register_alias=cfg.register_alias,
                step=step,
            )


def main(argv: list[str] | None = None) -> StageResult:
    from infra.cli import stage_main

    return stage_main(STAGE, TrainGPTConfig, __doc__, run, argv)


if __name__ == "__main__":
    main()
