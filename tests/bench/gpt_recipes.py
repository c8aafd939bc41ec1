"""The two transformer recipes the GPT benchmarks compare, on the same code batches.

- ``official``: the official minGPT (``taming.modules.transformer.mingpt.GPT``) with
  ``Net2NetTransformer.configure_optimizers``: AdamW betas (0.9, 0.95), weight decay 0.01 on Linear
  weights (none on biases, LayerNorms, embeddings, position embeddings), lr = 4.5e-6 x batch,
  constant, no dropout, no clipping; the class label is a token of the image vocabulary (no offset),
  the loss covers the image positions; spatial conditions (``prefix`` > 1, Net2NetTransformer with a
  cond stage) are their codes as a prefix sharing the ids too. ``schedule=True`` is the same model
  with linear warm-up + cosine decay to 0 at peak lr 2e-3 and clipping at 1 (the issue's middle figure).
- ``ours``: ``stages.train_gpt``'s defaults, as :func:`stages.train_gpt.plan` derives them, through
  the very step each Ray Train worker runs (:class:`models.gpt_training.GPTTrainer`), class ids
  after the image codes and condition dropout to the null token at 0.1.
"""

from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn.functional as F

BASE_LR = 4.5e-6  # taming's base_learning_rate; lr = base x batch (x GPUs x accumulation)


class OfficialRecipe:
    def __init__(
        self,
        codebook_size: int,
        tokens: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        batch: int,
        steps: int,
        schedule: bool = False,
        prefix: int = 1,
        cond_codebook_size: int = 0,
    ):
        # minGPT imports a helper of `transformers` at module level that training never calls
        sys.modules.setdefault("transformers", types.SimpleNamespace(top_k_top_p_filtering=None))
        from taming.modules.transformer import mingpt

        from models.optim import Schedule

        self.k, self.prefix = max(codebook_size, cond_codebook_size), prefix
        self.model = mingpt.GPT(
            self.k,  # the vocabulary: condition codes share the image codes' ids (no offset)
            tokens + prefix - 1,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            embd_pdrop=0.0,
            resid_pdrop=0.0,
            attn_pdrop=0.0,
        )
        decay = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Linear)}
        params = list(self.model.parameters())
        lr = 2e-3 if schedule else BASE_LR * batch
        self.opt = torch.optim.AdamW(
            [
                {"params": [p for p in params if id(p) in decay], "weight_decay": 0.01},
                {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
            ],
            lr=lr,
            betas=(0.9, 0.95),
        )
        self.schedule = Schedule(lr, steps, 100, True, 0.0) if schedule else None
        self.step = 0

    def train_step(self, labels: torch.Tensor, codes: torch.Tensor) -> None:
        if self.schedule is not None:
            for g in self.opt.param_groups:
                g["lr"] = self.schedule(self.step)
        self.model.train()
        seq = torch.cat([self._prefix(labels), codes], 1)  # the condition shares the code vocabulary
        logits, _ = self.model(seq[:, :-1])
        logits = logits[:, self.prefix - 1 :]  # the image positions
        loss = F.cross_entropy(logits.reshape(-1, self.k), codes.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.schedule is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1

    @torch.no_grad()
    def val_bits(self, labels: torch.Tensor, codes: torch.Tensor, batch: int = 500) -> float:
        self.model.eval()
        total = 0.0
        for lo in range(0, len(codes), batch):
            seq = torch.cat([self._prefix(labels[lo : lo + batch]), codes[lo : lo + batch]], 1)
            logits, _ = self.model(seq[:, :-1])
            logits = logits[:, self.prefix - 1 :]
            c = codes[lo : lo + batch]
            total += float(F.cross_entropy(logits.reshape(-1, self.k), c.reshape(-1), reduction="sum"))
        return total / codes.numel() / math.log(2)

    @staticmethod
    def _prefix(cond: torch.Tensor) -> torch.Tensor:
        """A class label (B,) as one token, condition codes (B, Lc) as they are."""
        return cond[:, None] if cond.dim() == 1 else cond

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class OurRecipe:
    def __init__(self, plan, steps: int, seed: int = 0):
        from models.gpt import GPT
        from models.gpt_training import GPTTrainer

        self.plan = plan
        torch.manual_seed(seed)
        self.trainer = GPTTrainer(GPT(plan.gpt), plan.recipe, plan.spec.codebook_size, steps)
        self.gen = torch.Generator()
        self.seed = seed

    def train_step(self, labels: torch.Tensor, codes: torch.Tensor) -> None:
        from models.gpt_training import step_generator
        from models.net2net import condition_prefix, drop_condition

        cond = self.plan.spec.condition
        step_generator(self.gen, self.seed, 0, self.trainer.step)  # as the stage's rank 0
        prefix = drop_condition(cond, condition_prefix(cond, labels), self.gen)
        self.trainer.train_step(prefix, codes, self.gen)

    def val_bits(self, labels: torch.Tensor, codes: torch.Tensor) -> float:
        from models.gpt_training import bits_per_token
        from models.net2net import condition_prefix

        return bits_per_token(
            self.trainer.final_model(), condition_prefix(self.plan.spec.condition, labels), codes
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.trainer.model.parameters())
