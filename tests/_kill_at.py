"""Callbacks for the resume tests: stop this process at a chosen outer step, as a crash or a scheduler
would."""

from __future__ import annotations

import os
import signal
import time

from lightning import Callback


class KillAt(Callback):
    """SIGKILL at the end of one outer step, after the other callbacks (Promotion's files) and before
    that step's checkpoint (ModelCheckpoint runs last)."""

    def __init__(self, step: int = -1):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:  # global_step counts the outer step just done
            os.kill(os.getpid(), signal.SIGKILL)


class TermAt(Callback):
    """SIGTERM at the start of outer step ``step`` (mid-step for the handler); ``hang``: that step then
    takes "forever" (a real model's step of many minutes)."""

    def __init__(self, step: int = -1, hang: bool = False):
        self.step = step
        self.hang = hang

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
            if self.hang:
                time.sleep(600)
