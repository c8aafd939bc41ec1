"""Generators for the sample stage's tests: GPTs with random weights saved as native ``train_gpt``
checkpoints (weights + :class:`~models.net2net.GeneratorSpec`), decoding with a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from infra import storage
from models import checkpoint
from models.gpt import GPT, GPTConfig
from models.net2net import GeneratorSpec, native_condition


def generator_file(
    path: Path,
    tokenizer: tuple[str, str],
    *,
    mode: str = "class",
    k: int = 16,
    grid: tuple[int, int] = (8, 8),
    classes: int = 3,
    cond_dropout: float = 0.1,
    cond_codebook: int = 0,
    prefix_length: int = 1,
    seed: int = 0,
    window: dict | None = None,
    condition: str = "depth",
    condition_tokenizer: tuple[str, str] | None = None,
    condition_params: dict | None = None,
) -> tuple[str, str]:
    """A random 2 x 32 GPT for ``mode`` (``class``, ``unconditional``, ``spatial`` on
    ``<condition>_codes``, tokenized by ``condition_tokenizer`` (uri, sha256)) saved at ``path``;
    ``window``: GPTConfig's local-attention fields; returns (uri, sha256)."""
    fields = {"class": {"n_classes": classes}, "spatial": {"cond_codebook_size": cond_codebook}}.get(mode, {})
    cond, vocab = native_condition(mode, k, cond_dropout, **fields)
    spec = GeneratorSpec(
        condition=cond,
        codebook_size=k,
        grid=grid,
        tokenizer_uri=tokenizer[0],
        tokenizer_sha256=tokenizer[1],
        label_names=[f"class{c}" for c in range(classes)] if mode == "class" else None,
        prefix_length=prefix_length,
        condition_column=f"{condition}_codes" if mode == "spatial" else None,
        condition_tokenizer_sha256=(condition_tokenizer or ("", "d" * 64))[1] if mode == "spatial" else None,
        condition_tokenizer_uri=condition_tokenizer[0] if condition_tokenizer else None,
        condition_params=condition_params,
    )
    torch.manual_seed(seed)
    local = {"grid_h": grid[0], "grid_w": grid[1], "n_prefix": prefix_length, **window} if window else {}
    gpt = GPT(
        GPTConfig(vocab_size=vocab, block_size=spec.block_size, n_layer=2, n_head=2, n_embd=32, **local)
    )
    with torch.no_grad():  # sharper than the init's near-uniform logits: samples that differ by seed
        gpt.head.weight.mul_(40.0)
    checkpoint.save_native(gpt.eval(), path, {"stage": "train_gpt", "generator": spec.to_dict()})
    return str(path), storage.file_sha256(path)
