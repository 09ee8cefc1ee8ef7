"""A callback for the resume tests: SIGKILL this process at the end of one outer step, after the
other callbacks (Promotion's files) and before that step's checkpoint (ModelCheckpoint runs last)."""

from __future__ import annotations

import os
import signal

from lightning import Callback


class KillAt(Callback):
    def __init__(self, step: int = -1):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:  # global_step counts the outer step just done
            os.kill(os.getpid(), signal.SIGKILL)
