"""NextTokenLM: plain next-token training of a causal LM.

It is the baseline for Self-Improving Pretraining and the recipe that builds the bundled
tiny bases (``configs/tiny/pretrain_student.yaml``). The model is either loaded from a hub
id / folder or created from scratch from a ``LlamaConfig``-style dict.

Two kinds of batch:

* ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` = no loss): plain pre-training;
* a prefix-suffix batch (``PrefixSuffixDataModule``: ``prefix_ids`` / ``prefix_mask``
  LEFT-padded, ``suffix_ids`` / ``suffix_mask`` RIGHT-padded): the input is prefix + suffix
  and the loss is the mean NLL of the suffix tokens only (the first one predicted from the
  prefix's last token). That is the next-token baseline of Self-Improving Pretraining on
  exactly the stream SIP trains on (``configs/tiny/sip_next_token.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from lit_selfimprove.modeling import (
    check_attn_implementation,
    check_lora,
    load_tokenizer,
    load_trained_model,
    save_pretrained_merged,
    warn_if_half_trainable,
)
from lit_selfimprove.modules._shared import (
    adamw_with_warmup,
    check_optimizer,
    cosine_schedule,
    estimated_total_steps,
)
from lit_selfimprove.rl.logprobs import sequence_logprobs

__all__ = ["NextTokenLM", "cosine_schedule"]  # cosine_schedule: moved to modules._shared, still importable


class NextTokenLM(LightningModule):
    """Next-token (teacher-forced) training of any Hugging Face causal LM.

    Args:
        model: hub id / local folder / ``builtin:NAME`` to start from; ``None`` to create a
            Llama model from ``model_config``.
        tokenizer: tokenizer to use (defaults to ``model``).
        model_config: ``transformers.LlamaConfig`` kwargs for a model trained from scratch.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup steps.
        min_lr_ratio: cosine floor as a fraction of ``lr``.
        optimizer: ``adamw`` (torch), ``adamw8bit`` (bitsandbytes' 8-bit AdamW: optimizer states in
            8 bits; CPU or GPU) or ``paged_adamw8bit`` (CUDA only); see
            :func:`~lit_selfimprove.modules._shared.adamw`.
        dtype: compute dtype (``float32`` on CPU; bf16 compute comes from the Trainer's
            ``precision: bf16-mixed``). The trained weights are always float32 master weights.
        attn_implementation: attention kernel of a model loaded from ``model`` (``None``:
            transformers' default, ``sdpa``; ``flash_attention_2`` needs flash-attn and a GPU).
        save_to: if set, the trained model and tokenizer are written there as a Hugging Face
            folder when training ends (with ``lora``: the adapters merged, a plain folder).
        lora: ``peft.LoraConfig`` kwargs (e.g. ``{r: 8, lora_alpha: 16, target_modules: all-linear}``)
            for a model loaded from ``model``: only the adapters train.
    """

    def __init__(
        self,
        model: str | None = None,
        tokenizer: str | None = None,
        model_config: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        optimizer: str = "adamw",
        dtype: str = "float32",
        attn_implementation: str | None = None,
        save_to: str | None = None,
        lora: dict | None = None,
    ):
        super().__init__()
        check_attn_implementation(attn_implementation)  # at start-up, not when the model loads
        check_optimizer(optimizer)
        check_lora(lora, model=model)
        if lora and model is None:
            raise ValueError(
                "lora needs a pretrained `model`: a model built from `model_config` trains every weight"
            )
        if model is None and model_config is None:
            raise ValueError(
                "NextTokenLM needs `model` (a hub id or folder) or `model_config` (from scratch)"
            )
        if model is None and tokenizer is None:
            raise ValueError("a model built from `model_config` needs a `tokenizer`")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        if hp.model is not None:
            self.model, _ = load_trained_model(
                hp.model,
                dtype=hp.dtype,
                attn_implementation=hp.get("attn_implementation"),
                lora=hp.get("lora"),
            )
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            cfg = dict(hp.model_config)
            cfg.setdefault("vocab_size", len(self.tokenizer))
            cfg.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            cfg.setdefault("bos_token_id", self.tokenizer.bos_token_id)
            cfg.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            self.model = LlamaForCausalLM(LlamaConfig(**cfg))
            rank_zero_info(
                f"NextTokenLM: new Llama with {sum(p.numel() for p in self.model.parameters()):,} parameters"
            )

    def _loss(self, batch: dict) -> torch.Tensor:
        if "prefix_ids" in batch:
            return self._suffix_loss(batch)
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        return out.loss

    def _suffix_loss(self, batch: dict) -> torch.Tensor:
        """Mean NLL of the suffix tokens of prefix + suffix (prefix and padding carry no loss)."""
        prefix_mask = batch["prefix_mask"].long()
        suffix_mask = batch["suffix_mask"].long()
        ids = torch.cat([batch["prefix_ids"], batch["suffix_ids"]], dim=1)
        attn = torch.cat([prefix_mask, suffix_mask], dim=1)
        target = torch.cat([torch.zeros_like(prefix_mask), suffix_mask], dim=1)
        logps = sequence_logprobs(self.model, ids, attn, target)  # [B, T-1], 0 off the suffix
        return -logps.sum() / target[:, 1:].sum().clamp(min=1)

    @staticmethod
    def _rows(batch: dict) -> int:
        return len(batch["prefix_ids" if "prefix_ids" in batch else "input_ids"])

    def on_fit_start(self) -> None:
        warn_if_half_trainable("NextTokenLM", self.model)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=self._rows(batch))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True, batch_size=self._rows(batch))

    def configure_optimizers(self):
        hp = self.hparams
        schedule = cosine_schedule(hp.warmup_steps, estimated_total_steps(self), hp.min_lr_ratio)
        params = self.model.parameters()
        return adamw_with_warmup(
            params,
            hp.lr,
            hp.weight_decay,
            schedule=schedule,
            betas=(0.9, 0.95),
            optimizer=hp.get("optimizer", "adamw"),
        )

    def on_train_end(self) -> None:
        if self.hparams.save_to and self.trainer.is_global_zero:
            path = Path(self.hparams.save_to)
            path.mkdir(parents=True, exist_ok=True)
            save_pretrained_merged(self.model, path)  # LoRA: adapters merged
            self.tokenizer.save_pretrained(path)
            rank_zero_info(f"NextTokenLM: saved the trained model to {path}")
