"""``python -m lit_selfimprove fit --config configs/...yaml`` (LightningCLI, subclass mode)."""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

import lit_selfimprove.callbacks  # noqa: F401  (short class names resolve)
import lit_selfimprove.datamodules  # noqa: F401
import lit_selfimprove.modules  # noqa: F401

TOOLS = {
    "failk": "lit_selfimprove.failk",
    "world": "lit_selfimprove.world",
    "sample-questions": "lit_selfimprove.sample_questions",
}


def main(args: list[str] | None = None) -> LightningCLI | None:
    """Run LightningCLI; ``failk ...`` / ``world ...`` / ``sample-questions ...`` dispatch to the tools."""
    # noise from Lightning's own internals (pytree API change), not actionable by users
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in TOOLS:
        import importlib

        importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        return None
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,  # None: LightningCLI reads sys.argv itself
    )
