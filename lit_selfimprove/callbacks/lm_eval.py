"""LMEval: standard-benchmark accuracy of the training policy at validation time (lm-eval).

Every ``every_n_val_runs``-th validation run (sanity checks excluded), the module's policy
(``pl_module.policy``: SuffixPolicyDPO, StudentRLVR; ``pl_module.model``: NextTokenLM) and its
``pl_module.tokenizer`` are evaluated in memory on lm-evaluation-harness tasks
(:func:`lit_selfimprove.evaluation.evaluate_model`), and ``lm_eval/<task>`` (each task's score:
``acc_norm`` where the task reports it, else ``acc``) and ``lm_eval/average`` are logged through
the module's logger at the current step. Each run's summary is also appended to
``lm_eval.jsonl`` in the log dir.

    callbacks:
      - class_path: lit_selfimprove.callbacks.LMEval
        init_args:
          tasks: [boolq, piqa, social_iqa, hellaswag, arc_easy, arc_challenge, openbookqa, mmlu]
          every_n_val_runs: 5
          limit: 500            # documents per task: the full sets take long at every validation

Every rank runs the evaluation (a sharded FSDP2 policy needs all ranks in its forwards; lm-eval
sees one process each) and the results of global rank 0 are logged. The global RNG states and the
policy's train / eval mode are restored afterwards, so training draws what it would have drawn.
Without network access each task's dataset must be local
(see :mod:`lit_selfimprove.evaluation.lm_eval_adapter`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from lit_selfimprove.evaluation.checkpoint import MODEL_ATTRIBUTES
from lit_selfimprove.evaluation.lm_eval_adapter import METRICS, evaluate_model, split_names


class LMEval(Callback):
    """Evaluate the policy on lm-eval tasks every N validation runs and log ``lm_eval/*``.

    Args:
        tasks: lm-eval task / group names (paper: boolq, piqa, social_iqa, hellaswag, arc_easy,
            arc_challenge, openbookqa, mmlu).
        every_n_val_runs: evaluate at the N-th, 2N-th, ... validation run.
        include_path: folder(s) of task YAMLs of your own (local datasets).
        limit: at most this many documents per task (a float < 1: that share).
        batch_size: requests per forward.
        num_fewshot: few-shot examples (``None``: each task's default).
        metric: ``auto`` (``acc_norm`` where reported, else ``acc``), ``acc`` or ``acc_norm``.
        max_length: context length (``None``: the model's).
        attribute: the module's attribute holding the model (``None``: ``policy``, else ``model``).
        filename: JSON-lines file in the log dir for each run's summary (``None``: none).
        seed: lm-eval's seeds (the training RNGs are restored afterwards).
    """

    def __init__(
        self,
        tasks: list[str] | str,
        every_n_val_runs: int = 1,
        include_path: list[str] | str | None = None,
        limit: int | float | None = None,
        batch_size: int = 8,
        num_fewshot: int | None = None,
        metric: str = "auto",
        max_length: int | None = None,
        attribute: str | None = None,
        filename: str | None = "lm_eval.jsonl",
        seed: int = 0,
    ):
        self.tasks = split_names(tasks)
        if not self.tasks:
            raise ValueError("LMEval needs at least one task")
        if every_n_val_runs < 1:
            raise ValueError(f"every_n_val_runs must be >= 1, got {every_n_val_runs}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.every_n_val_runs = every_n_val_runs
        self.include_path = include_path
        self.limit = limit
        self.batch_size = batch_size
        self.num_fewshot = num_fewshot
        self.metric = metric
        self.max_length = max_length
        self.attribute = attribute
        self.filename = filename
        self.seed = seed
        self.val_runs = 0
        self.last: dict[str, Any] | None = None  # the latest summary

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from lit_selfimprove.evaluation.lm_eval_adapter import require_lm_eval

        require_lm_eval()  # fail at start-up, not at the first evaluation

    def _model(self, pl_module: LightningModule) -> torch.nn.Module:
        names = [self.attribute] if self.attribute else list(MODEL_ATTRIBUTES)
        for name in names:
            model = getattr(pl_module, name, None)
            if isinstance(model, torch.nn.Module):
                return model
        raise AttributeError(f"LMEval: {type(pl_module).__name__} has no model in {names}")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_runs += 1
        if self.val_runs % self.every_n_val_runs:
            return
        with trainer.precision_plugin.forward_context():
            summary = evaluate_model(
                self._model(pl_module),
                pl_module.tokenizer,
                self.tasks,
                include_path=self.include_path,
                limit=self.limit,
                batch_size=self.batch_size,
                num_fewshot=self.num_fewshot,
                metric=self.metric,
                max_length=self.max_length,
                progress=False,
                seed=self.seed,
            )
        if trainer.world_size > 1:  # lm-eval reports on LOCAL_RANK 0 only: rank 0's for everyone
            summary = trainer.strategy.broadcast(summary, src=0)
        if summary is None:
            return
        self.last = summary
        metrics = {f"lm_eval/{task}": e["score"] for task, e in summary["tasks"].items()}
        metrics["lm_eval/average"] = summary["average"]
        for name, value in metrics.items():
            if value is not None:
                pl_module.log(name, float(value), on_step=False, on_epoch=True, batch_size=1, sync_dist=False)
        if self.filename and trainer.is_global_zero:
            self._append(trainer, summary)

    def _append(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        row = {
            "step": trainer.global_step,
            "average": summary["average"],
            "metric": summary["metric"],
            "tasks": summary["tasks"],
            "limit": summary.get("limit"),
            "seconds": summary.get("seconds"),
        }
        with open(folder / self.filename, "a") as f:
            f.write(json.dumps(row) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"val_runs": self.val_runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_runs = int(state_dict.get("val_runs", 0))
