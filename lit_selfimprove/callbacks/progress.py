"""A progress bar that counts optimizer steps out of ``max_steps`` (SOAR: outer steps)."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n


class StepProgressBar(TQDMProgressBar):
    """TQDM bar over the whole run: ``step 6/20`` rather than Lightning's ``Epoch 6/-2``.

    Runs bounded by ``max_steps`` (every RL module here: one optimizer step per batch, and SOAR's
    outer step is one step) see where they are in the run; an "epoch" of a streaming or
    resampled data source means little. Without ``max_steps`` it behaves like Lightning's bar.

    Args:
        description: the bar's label (default ``step``).
    """

    def __init__(self, description: str = "step", **kwargs: Any):
        super().__init__(**kwargs)
        self.description = description

    def _by_step(self, trainer: Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self._by_step(trainer):
            bar = self.train_progress_bar
            bar.total = trainer.max_steps
            bar.set_description(self.description)
            _update_n(bar, trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._by_step(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            _update_n(bar, trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
