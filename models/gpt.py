"""The transformer of *Taming Transformers* (Esser et al., CVPR 2021): a GPT (Radford et al. 2018)
over codebook indices, as taming's minGPT, with fast sampling.

State-dict names match taming's minGPT (``tok_emb``, ``pos_emb``, ``blocks.{i}.ln1/ln2``,
``attn.key/query/value/proj``, ``mlp.0``, ``mlp.2``, ``ln_f``, ``head``), so official transformer
weights load strictly; the official per-block ``attn.mask`` buffer is accepted and dropped (the
causal mask is built on the fly). Attention runs through ``scaled_dot_product_attention``.

Sampling keeps a preallocated KV cache (no re-concatenation per step), takes its randomness as
per-sample ``torch.Generator``s or as precomputed uniforms (one per sample and position, drawn
by inverse CDF: no generator state, so a sample depends on its own numbers alone), top-k/top-p
filtering and classifier-free guidance (Ho & Salimans 2022) by batch doubling:
``logits = uncond + s * (cond - uncond)``, ``s`` constant or one per position.
``temperature=0`` samples greedily.

``attention``: ``full`` (the official model) or local attention over the code grid, ``local2d``
(the Image Transformer's query and memory blocks) or ``local1d`` (:mod:`models.local_attention`):
the cost of a layer grows linearly with the grid, positions are relative (a model samples grids
larger than it was trained on, :meth:`GPT.generate` with ``grid``), and the sampling cache keeps
only what the window can still see. Every public method takes and returns image codes in raster
order whatever the attention; a local model generates in its own order inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import local_attention as local
from models.token_sampling import Generators, Scales, per_step, sample_next


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 16384  # condition and image tokens share it in compat mode
    block_size: int = 256  # longest input: condition + image tokens - 1
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1024
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    n_unmasked: int = 0  # the first n positions attend to each other bidirectionally (official option)
    bidirectional: bool = False  # every position sees every other: the masked prior (models.maskgit)
    # attention: "full", or local attention over the code grid ("local1d", "local2d")
    attention: str = "full"
    grid_h: int = 0  # local: the code grid trained on (sampling takes larger ones)
    grid_w: int = 0
    n_prefix: int = 1  # local: condition tokens before the grid; every position attends to them all
    block_h: int = 8  # local2d: query blocks of block_h x block_w codes; local1d: block_w codes
    block_w: int = 8
    flange_top: int = 4  # local2d: memory rows above the query block
    flange_left: int = 4  # memory columns left of it (local1d: codes before it)
    flange_right: int = 4  # local2d: memory columns right of it

    def __post_init__(self):
        if self.attention not in ("full", *local.KINDS):
            raise ValueError(f"attention must be one of {('full', *local.KINDS)}, got {self.attention!r}")
        if self.is_local:
            if self.n_unmasked or self.bidirectional:
                raise ValueError("n_unmasked and bidirectional are options of full attention only")
            if self.n_prefix < 1 or self.grid_h < 1 or self.grid_w < 1:
                raise ValueError(f"{self.attention} needs grid_h, grid_w and n_prefix >= 1")
            self.window()  # the blocks must tile the grid

    @property
    def is_local(self) -> bool:
        return self.attention != "full"

    @property
    def grid(self) -> tuple[int, int]:
        return (self.grid_h, self.grid_w)

    def window(self, grid: tuple[int, int] | None = None) -> local.Window:
        """The local window on ``grid`` (default: the training grid)."""
        return local.window(
            self.attention,
            grid or self.grid,
            (self.block_h, self.block_w),
            (self.flange_top, self.flange_left, self.flange_right),
        )


# Named sizes. ``train_gpt`` takes layers, heads and width from a preset and derives the vocabulary
# and context from the data (codebook + condition tokens, condition + grid).
PRESETS: dict[str, GPTConfig] = {
    # the demo and the quality benchmark: 4 x 128 (0.93M parameters with 8x8 codes of 512)
    "gpt-demo": GPTConfig(vocab_size=512 + 11, block_size=64, n_layer=4, n_head=4, n_embd=128),
    # the benchmark model of this project's sampling benchmark: 12 x 512, 256 image tokens
    "gpt-12x512": GPTConfig(vocab_size=1024, block_size=256, n_layer=12, n_head=8, n_embd=512),
    # LlamaGen's sizes (Sun et al. 2024): GPT-B 111M, GPT-L 343M, GPT-XL 775M at 256 tokens
    "gpt-b": GPTConfig(vocab_size=16384 + 1001, block_size=256, n_layer=12, n_head=12, n_embd=768),
    "gpt-l": GPTConfig(vocab_size=16384 + 1001, block_size=256, n_layer=24, n_head=16, n_embd=1024),
    "gpt-xl": GPTConfig(vocab_size=16384 + 1001, block_size=256, n_layer=36, n_head=20, n_embd=1280),
    # taming's ImageNet class-conditional transformer (cin_transformer): 16384 codes, 48 x 1536, 1.4B
    "taming-cin": GPTConfig(vocab_size=16384, block_size=256, n_layer=48, n_head=24, n_embd=1536),
    # S-FLCKR / depth-conditional style: 256 condition + 256 image tokens
    "taming-cond-512": GPTConfig(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024),
}


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, 2, B, n_head, T_max, head_dim)."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        if max_len > cfg.block_size:
            raise ValueError(f"cache of {max_len} positions exceeds block_size {cfg.block_size}")
        hd = cfg.n_embd // cfg.n_head
        self.kv = torch.empty(cfg.n_layer, 2, batch, cfg.n_head, max_len, hd, device=device, dtype=dtype)
        self.max_len = max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_drop = cfg.attn_pdrop
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)
        self.n_head, self.n_unmasked, self.bidirectional = cfg.n_head, cfg.n_unmasked, cfg.bidirectional
        if cfg.is_local:  # a learned bias per head for each (row, column) offset in the window
            self.rel_bias = nn.Parameter(torch.zeros(cfg.n_head, cfg.window().n_rel))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        hd = c // self.n_head
        return tuple(
            lin(x).view(b, t, self.n_head, hd).transpose(1, 2) for lin in (self.query, self.key, self.value)
        )

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, hd = y.shape
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, self.n_head * hd)))

    def forward_local(self, x: torch.Tensor, n_prefix: int, lay: local.Layout) -> torch.Tensor:
        """The whole sequence (prefix, then the slots in generation order) under local attention."""
        q, k, v = self._qkv(x)
        drop = self.attn_drop if self.training else 0.0
        return self._out(local.blocked_attention(q, k, v, n_prefix, lay, self.rel_bias, drop))

    def step_local(self, x: torch.Tensor, cache: local.LocalKVCache, layer: int) -> torch.Tensor:
        """One slot (x: (B, 1, C)) under local attention, through the ring cache."""
        q, k, v = self._qkv(x)
        return self._out(local.cached_step(q, k, v, cache, layer))

    def prefill_local(self, x: torch.Tensor, cache: local.LocalKVCache, layer: int) -> torch.Tensor:
        """The condition prefix (causal among itself), its keys/values kept for every later slot."""
        q, k, v = self._qkv(x)
        p = cache.n_prefix
        cache.kv[layer, 0, :, :, :p], cache.kv[layer, 1, :, :, :p] = k, v
        return self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def _mask(self, t_q: int, start: int, device) -> torch.Tensor | None:
        """Boolean (t_q, start + t_q) mask: query i (absolute start+i) sees keys <= start+i."""
        t_k = start + t_q
        q_pos = torch.arange(start, t_k, device=device)[:, None]
        k_pos = torch.arange(t_k, device=device)[None, :]
        allowed = k_pos <= q_pos
        if self.n_unmasked:
            allowed = allowed | ((q_pos < self.n_unmasked) & (k_pos < self.n_unmasked))
        return allowed

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self._qkv(x)
        if cache is not None:  # cache: (2, B, nh, T_max, hd) of this layer
            cache[0, :, :, start : start + t] = k
            cache[1, :, :, start : start + t] = v
            k, v = cache[0, :, :, : start + t], cache[1, :, :, : start + t]
        drop = self.attn_drop if self.training else 0.0
        if self.bidirectional:
            if cache is not None or start:
                raise ValueError("a bidirectional model sees the whole sequence at once: no cache")
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        elif start == 0 and not self.n_unmasked:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)  # (B, nh, T, hd)
        elif t == 1 and not self.n_unmasked:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # one new token sees everything
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self._mask(t, start, x.device), dropout_p=drop
            )
        return self._out(y)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "mask", None)  # the official causal-mask buffer: rebuilt on the fly
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.resid_pdrop),
        )

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        return self.run(x, lambda h: self.attn(h, cache, start))

    def run(self, x: torch.Tensor, attend) -> torch.Tensor:
        """The block with ``attend`` (normalised input -> attention output) as its attention."""
        x = x + attend(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # local: absolute positions for the condition prefix only; grid slots get an embedding of
        # their place in the query block (plus the relative bias in every layer)
        self.pos_emb = nn.Parameter(
            torch.zeros(1, cfg.n_prefix if cfg.is_local else cfg.block_size, cfg.n_embd)
        )
        if cfg.is_local:
            self.blk_emb = nn.Parameter(torch.zeros(1, cfg.window().query_len, cfg.n_embd))
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg: GPTConfig | str | dict) -> GPT:
        if isinstance(cfg, str):
            if cfg not in PRESETS:
                raise KeyError(f"unknown GPT preset {cfg!r}; known: {sorted(PRESETS)}")
            cfg = PRESETS[cfg]
        elif isinstance(cfg, dict):
            cfg = GPTConfig(**cfg)
        return cls(cfg)

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V). With ``cache``, idx holds positions [start, start + T).

        A local model takes the whole sequence, the prefix then the grid's codes in raster order
        without the last (T = n_prefix + h * w - 1, ``grid`` default the training grid), and returns
        the logits in the same order, each predicting its code from those generated before it."""
        if self.config.is_local:
            if cache is not None or start:
                raise ValueError("a local model's cache is a LocalKVCache: use generate or cached_logits")
            return self._forward_local(idx, grid)
        t = idx.shape[1]
        if start + t > self.config.block_size:
            raise ValueError(f"sequence of {start + t} tokens exceeds block_size {self.config.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, start : start + t])  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.kv[i], start)
        return self.head(self.ln_f(x))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.pos_emb
        return KVCache(self.config, batch, max_len, device=p.device, dtype=p.dtype)

    # local attention ---------------------------------------------------------------------------

    def _layout(self, grid: tuple[int, int] | None) -> local.Layout:
        return local.layout_on(self.config.window(grid), self.pos_emb.device)

    def _slot_inputs(self, tokens: torch.Tensor, first_slot: int) -> torch.Tensor:
        """Embeddings of codes fed to consecutive slots from ``first_slot`` (the code generated
        before each slot), with the slot's place in its query block."""
        lq = self.blk_emb.shape[1]
        where = torch.arange(first_slot, first_slot + tokens.shape[1], device=tokens.device) % lq
        return self.tok_emb(tokens) + self.blk_emb[:, where]

    def _prefix_inputs(self, prefix: torch.Tensor) -> torch.Tensor:
        p = self.config.n_prefix
        if prefix.shape[1] != p:
            raise ValueError(f"this model takes {p} condition tokens, got {prefix.shape[1]}")
        slot0 = F.pad(self.blk_emb[:, :1], (0, 0, p - 1, 0))  # the last condition token is slot 0
        return self.tok_emb(prefix) + self.pos_emb + slot0

    def _forward_local(self, idx: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        lay = self._layout(grid)
        p, n = self.config.n_prefix, lay.order.numel()
        if idx.shape[1] != p + n - 1:
            raise ValueError(
                f"a {self.config.attention} model takes {p} condition tokens + {n} - 1 codes, "
                f"got {idx.shape[1]}"
            )
        raster = F.pad(idx[:, p:], (0, 1))  # the last code (never an input) is the last generated too
        gen = raster[:, lay.order[:-1]]
        x = self.drop(torch.cat([self._prefix_inputs(idx[:, :p]), self._slot_inputs(gen, 1)], 1))
        for block in self.blocks:
            x = block.run(x, lambda h, a=block.attn: a.forward_local(h, p, lay))
        logits = self.head(self.ln_f(x))
        slots = logits[:, p - 1 :]
        return torch.cat([logits[:, : p - 1], slots[:, lay.slot_of]], 1)

    def new_local_cache(self, batch: int, grid: tuple[int, int] | None = None) -> local.LocalKVCache:
        c, p = self.config, self.pos_emb
        biases = [b.attn.rel_bias.detach() for b in self.blocks]
        lay = self._layout(grid)
        return local.LocalKVCache(
            biases, batch, c.n_embd // c.n_head, c.n_prefix, lay, device=p.device, dtype=p.dtype
        )

    def _local_prefill(self, prefix: torch.Tensor, cache: local.LocalKVCache) -> torch.Tensor:
        """Logits (B, V) of slot 0 (the first generated position) from the condition prefix."""
        x = self._prefix_inputs(prefix)
        for i, block in enumerate(self.blocks):
            x = block.run(x, lambda h, a=block.attn, i=i: a.prefill_local(h, cache, i))
        cache.slot = 1
        return self.head(self.ln_f(x[:, -1]))

    def _local_step(self, token: torch.Tensor, cache: local.LocalKVCache) -> torch.Tensor:
        """Feed the code generated at slot ``cache.slot - 1`` (B, 1) -> logits (B, V) of the next."""
        x = self._slot_inputs(token, cache.slot)
        for i, block in enumerate(self.blocks):
            x = block.run(x, lambda h, a=block.attn, i=i: a.step_local(h, cache, i))
        cache.slot += 1
        return self.head(self.ln_f(x[:, -1]))

    def generation_order(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(h * w,) the raster index of each generated position, in generation order."""
        if not self.config.is_local:  # raster order
            h, w = grid or (1, self.config.block_size)
            return torch.arange(h * w)
        return local.layout(self.config.window(grid)).order

    @torch.no_grad()
    def cached_logits(
        self, prefix: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Logits (B, 1 + n, V) through the sampling cache: after the prefix (B, P), then after each
        of the n codes in ``tokens`` (B, n), fed one at a time in generation order."""
        if not self.config.is_local:
            p, n = prefix.shape[1], tokens.shape[1]
            cache = self.new_cache(prefix.shape[0], p + n)
            out = [self(prefix, cache, 0)[:, -1]]
            out += [self(tokens[:, s : s + 1], cache, p + s)[:, -1] for s in range(n)]
            return torch.stack(out, 1)
        cache = self.new_local_cache(prefix.shape[0], grid)
        if tokens.shape[1] >= cache.layout.order.numel():
            raise ValueError(f"{tokens.shape[1]} codes fed: the grid's last code is never an input")
        out = [self._local_prefill(prefix, cache)]
        out += [self._local_step(tokens[:, s : s + 1], cache) for s in range(tokens.shape[1])]
        return torch.stack(out, 1)

    @torch.no_grad()
    def generate(
        self,
        prefix: torch.Tensor,
        steps: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: Scales = None,
        uncond_prefix: torch.Tensor | None = None,
        generator: Generators = None,
        n_codes: int | None = None,
        uniforms: torch.Tensor | None = None,
        grid: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """prefix (B, P) -> (B, P + steps): the prefix followed by ``steps`` sampled tokens.

        A local model samples a whole grid (``steps`` = h * w of ``grid``, default the training
        grid, which may be larger than it) in its generation order and returns it in raster order;
        ``uniforms`` and per-step scales are then per raster position.

        ``n_codes``: sample only ids below it (native models keep condition and null tokens after
        the image codes, and those are never image content). ``uniforms`` (B, steps): the random
        numbers of each sample, position by position (instead of ``generator``).

        With ``cfg_scale`` (one number, or one per step), ``uncond_prefix`` (B, P) is the same prefix
        with the condition replaced by the null condition; both halves get the same sampled token.
        """
        b, p = prefix.shape
        if steps < 1:
            return prefix
        guided = cfg_scale is not None
        if guided and (uncond_prefix is None or uncond_prefix.shape != prefix.shape):
            raise ValueError("classifier-free guidance needs uncond_prefix with the prefix's shape")
        scales = per_step(cfg_scale, steps)
        if uniforms is not None and tuple(uniforms.shape) != (b, steps):
            raise ValueError(f"uniforms must be (batch, steps) = {(b, steps)}, got {tuple(uniforms.shape)}")
        x = torch.cat([prefix, uncond_prefix]) if guided else prefix
        limit = slice(None) if n_codes is None else slice(0, n_codes)
        if self.config.is_local:
            cache = self.new_local_cache(x.shape[0], grid)
            order = cache.layout.order.tolist()
            if steps != len(order):
                raise ValueError(
                    f"a {self.config.attention} model samples whole grids: {len(order)} steps, not {steps}"
                )
            logits = self._local_prefill(x, cache)[:, limit]

            def feed(tok: torch.Tensor, s: int) -> torch.Tensor:
                return self._local_step(tok, cache)[:, limit]
        else:
            cache = self.new_cache(x.shape[0], p + steps - 1)
            order = range(steps)
            logits = self(x, cache, 0)[:, -1, limit]

            def feed(tok: torch.Tensor, s: int) -> torch.Tensor:
                return self(tok, cache, p + s)[:, -1, limit]

        out = torch.empty(b, steps, dtype=torch.long, device=prefix.device)
        for s, pos in enumerate(order):
            if guided:
                cond, uncond = logits.float().chunk(2)
                logits = uncond + scales[pos] * (cond - uncond)
            u = None if uniforms is None else uniforms[:, pos]
            tok = sample_next(logits, temperature, top_k, top_p, generator, u)
            out[:, pos] = tok[:, 0]
            if s < steps - 1:
                logits = feed(torch.cat([tok, tok]) if guided else tok, s)
        return torch.cat([prefix, out], dim=1)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
