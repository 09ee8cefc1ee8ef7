"""Promotion: writes SOAR's promotions to disk (the PQ file and the promoted students).

The promotion itself is step 5 of :class:`~lit_selfimprove.modules.TeacherMetaRL`'s outer step
(:class:`lit_selfimprove.rl.promotion.PromotionRule`: a full window of Rbar_t = mean_k R_k averaging
above ``tau``, a best dataset k* that beat the baseline, the history restarting afterwards; the
median-reward student of X_k* installed as the baseline on every rank; the rule's state in the
module's checkpoint). After an outer step that promoted, this callback writes, on global rank 0:

* the pairs of X_k* appended to ``promotion_questions.jsonl`` (PQ, D_best) in the log dir, one JSON
  object per line: ``question``, ``answer``, ``step`` (the outer step), ``promotion`` (0-based
  index), ``dataset`` (k*), ``reward`` (R_k*) and ``run_id`` (the run that wrote it, see
  :class:`~lit_selfimprove.callbacks.RunDirectory`);
* the promoted student as a Hugging Face folder ``students/promotion_<i>_step_<step>/`` (model +
  student tokenizer), written under a temporary name and renamed when complete (a full disk leaves
  no partial folder under the final name).

Resuming: the callback's state (PQ lines written, the last outer step seen) is in the checkpoint.
On resume, PQ lines and student folders written after the checkpoint (a crash between writing and
checkpointing) are removed, so that nothing is duplicated. Resume with ``--ckpt_path=last`` (the
same run directory) or pass ``dirpath``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_selfimprove.callbacks.run_directory import run_id_of
from lit_selfimprove.modeling import save_pretrained_merged
from lit_selfimprove.rl.promotion import PromotionRule


class Promotion(Callback):
    """Writes SOAR's promotions to disk: the PQ file and the promoted students.

    The promotion itself (Algorithm 1, step 5: the rule, installing the median student as the
    baseline, the rule's checkpointed state) belongs to :class:`~lit_selfimprove.modules.TeacherMetaRL`
    and happens with or without this callback; its settings (``tau``, ``window``, ...) are the module's
    ``promotion:`` group, their one owner. The properties below read the module's rule and promotions.

    Args:
        pq_filename: name of the promotion-questions JSONL file in the log dir.
        save_students: save each promoted student as a Hugging Face folder in the log dir.
        dirpath: where files go (default: ``trainer.log_dir``, else ``trainer.default_root_dir``).
    """

    def __init__(
        self,
        pq_filename: str = "promotion_questions.jsonl",
        save_students: bool = True,
        dirpath: str | None = None,
    ):
        super().__init__()
        self.pq_filename = pq_filename
        self.save_students = save_students
        self.dirpath = dirpath
        self.module: Any = None  # the TeacherMetaRL whose promotions are written (set at setup)
        self.pq_lines = 0
        self.last_step: int | None = None
        self._resumed = False

    # ------------------------------------------------------------- the module's rule, read-only
    @property
    def rule(self) -> PromotionRule:
        return self.module.promotion_rule

    @property
    def promotions(self) -> list[dict[str, Any]]:
        return self.module.promotions if self.module is not None else []

    @property
    def count(self) -> int:
        """Number of promotions so far."""
        return len(self.promotions)

    @property
    def history(self) -> list[float]:
        """Rbar of the outer steps since the start (or the last promotion, with the reset)."""
        return self.rule.history

    def moving_average(self) -> float | None:
        """Mean of the last ``window`` values of the history (``None`` while it is shorter)."""
        return self.rule.moving_average()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.module = pl_module

    # ------------------------------------------------------------------------ the files
    def output_dir(self, trainer: Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def pq_path(self, trainer: Trainer) -> Path:
        return self.output_dir(trainer) / self.pq_filename

    # ------------------------------------------------------------------------ the hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = self.output_dir(trainer)  # trainer.log_dir is a collective: every rank asks
        if self._resumed and trainer.is_global_zero:
            self._drop_unrecorded(out)
        self._resumed = False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.module = pl_module
        last = getattr(pl_module, "last_outer", None)
        if last is None or last.step == self.last_step:
            return  # no outer step happened (or this one was seen already)
        self.last_step = last.step
        if last.promoted:
            self._write(trainer, pl_module, last)

    def _write(self, trainer, pl_module, last) -> None:
        """The PQ rows and the promoted student of outer step ``last`` (rank 0 writes)."""
        index, k_star = last.promotion_index, last.promotion.dataset
        reward = float(last.rewards[k_star])
        run_id = run_id_of(trainer)
        pairs = last.datasets[k_star]
        out = self.output_dir(trainer)  # trainer.log_dir is a collective: every rank asks
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / self.pq_filename, "a") as f:
                for pair in pairs:
                    row = {
                        "question": pair["question"],
                        "answer": pair["answer"],
                        "step": last.step,
                        "promotion": index,
                        "dataset": k_star,
                        "reward": reward,
                        "run_id": run_id,
                    }
                    f.write(json.dumps(row) + "\n")
            if self.save_students:
                folder = out / "students" / f"promotion_{index}_step_{last.step}"
                tmp = folder.with_name(folder.name + ".partial")
                shutil.rmtree(tmp, ignore_errors=True)
                save_pretrained_merged(pl_module.student, tmp)  # LoRA: adapters merged, plain HF folder
                tok = getattr(pl_module, "student_tokenizer", None)
                if tok is not None:
                    tok.save_pretrained(tmp)
                tmp.rename(folder)  # complete, or not there at all
        self.pq_lines += len(pairs)
        rank_zero_info(f"Promotion {index}: {len(pairs)} PQ pairs appended to {out / self.pq_filename}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = self.output_dir(trainer)  # a collective: every rank asks
        if self.promotions:
            rank_zero_info(
                f"SOAR: {self.count} promotions; promotion questions (PQ): {out / self.pq_filename} "
                f"({self.pq_lines} pairs); promoted students: {out / 'students'}"
            )
        elif not getattr(pl_module, "promotes", True):  # no rule ran: tau played no part
            rank_zero_info(
                "SOAR: no promotion: promotions are off (promotion.promote=false, or "
                "teacher_reward='intrinsic', which trains no students)"
            )
        else:
            rank_zero_info(
                f"SOAR: no promotion (the moving average of the teacher reward was never above "
                f"promotion.tau={self.rule.tau} with a dataset that beat the baseline)"
            )

    def _drop_unrecorded(self, out: Path) -> None:
        """After a resume: cut the PQ file to the recorded lines, remove unrecorded student folders."""
        path = out / self.pq_filename
        if path.exists():
            with open(path) as f:
                lines = f.readlines()
            if len(lines) > self.pq_lines:
                rank_zero_warn(
                    f"{path} has {len(lines)} lines, the checkpoint recorded {self.pq_lines}: truncating"
                )
                with open(path, "w") as f:
                    f.writelines(lines[: self.pq_lines])
            elif len(lines) < self.pq_lines:
                rank_zero_warn(f"{path} has {len(lines)} lines, the checkpoint recorded {self.pq_lines}")
        elif self.pq_lines:
            rank_zero_warn(f"{path} is missing; the checkpoint recorded {self.pq_lines} PQ lines")
        students = out / "students"
        if students.is_dir():
            for folder in students.iterdir():
                m = re.fullmatch(r"promotion_(\d+)_step_(\d+)(\.partial)?", folder.name)
                if m and (int(m.group(1)) >= self.count or m.group(3)) and folder.is_dir():
                    shutil.rmtree(folder)

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"pq_lines": self.pq_lines, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pq_lines = int(state_dict["pq_lines"])
        self.last_step = state_dict.get("last_step")
        self._resumed = True
