"""Write the trained model as a plain Hugging Face folder at the end of ``fit``.

For RL runs whose result is a model used elsewhere: a judge or rewriter trained with
:class:`~lit_selfimprove.modules.StudentRLVR` is loaded afterwards by
:class:`~lit_selfimprove.judges.HFChatBackend` (``model: <folder>``).
"""

from __future__ import annotations

from pathlib import Path

from lightning import Callback
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["SaveHFModel"]


class SaveHFModel(Callback):
    """``save_pretrained`` of ``pl_module.<attr>`` (LoRA adapters merged) and its tokenizer after training.

    Args:
        dirpath: the folder; ``None``: ``<log_dir>/<name>`` of the run (e.g. ``runs/judge_grpo/version_0/hf``).
        attr: the module attribute holding the trained model (``policy`` for ``StudentRLVR``).
        name: the subfolder name when ``dirpath`` is ``None``.

    Under several processes the full weights are gathered on every rank (FSDP shards), rank 0 writes.
    ``path`` holds the folder written (``None`` before).
    """

    def __init__(self, dirpath: str | None = None, attr: str = "policy", name: str = "hf"):
        self.dirpath, self.attr, self.name = dirpath, attr, name
        self.path: Path | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        from lit_selfimprove.distributed import world
        from lit_selfimprove.modeling import save_pretrained_merged

        model = getattr(pl_module, self.attr)
        log_dir = trainer.log_dir  # a collective: every rank asks
        folder = Path(self.dirpath) if self.dirpath else Path(log_dir or trainer.default_root_dir) / self.name
        state = None
        if world()[0] > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        self.path = folder
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            save_pretrained_merged(model, folder, state_dict=state)
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            rank_zero_info(f"SaveHFModel: the trained model is in {folder}")
