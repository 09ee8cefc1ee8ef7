"""Settings that moved, so that an old config fails with a message saying where each one went.

``MOVED[class name][old init argument] = new place`` (a dotted path under the same class, e.g.
``"promotion.tau"``, or a sentence when the setting moved to another class). The command line checks
every ``--config`` file and ``--model.*`` override against it before LightningCLI parses them
(:func:`check_moved_settings`); LightningCLI alone would only say the key is unknown.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

MOVED: dict[str, dict[str, str]] = {
    "TeacherMetaRL": {
        "teacher_batch": "teacher_sampling.batch",
        "max_sampling_rounds": "teacher_sampling.max_rounds",
        "teacher_max_new_tokens": "teacher_sampling.max_new_tokens",
        "teacher_temperature": "teacher_sampling.temperature",
        "teacher_top_p": "teacher_sampling.top_p",
        "answer_check": "teacher_sampling.answer_check",
        "max_answer_chars": "teacher_sampling.max_answer_chars",
        "lr": "teacher_update.lr",
        "weight_decay": "teacher_update.weight_decay",
        "warmup_steps": "teacher_update.warmup_steps",
        "optimizer": "teacher_update.optimizer",
        "kl_coef": "teacher_update.kl_coef",
        "kl_estimator": "teacher_update.kl_estimator",
        "max_grad_norm": "teacher_update.max_grad_norm",
        "teacher_micro_batch_size": "teacher_update.micro_batch_size",
        "promote": "promotion.promote",
        "promotion_tau": "promotion.tau",
        "promotion_window": "promotion.window",
        "reset_after_promotion": "promotion.reset_after_promotion",
        "require_improvement": "promotion.require_improvement",
        "median": "promotion.median",
        "keep_median_students": "promotion.keep_median_students",
        "median_students_dir": "promotion.median_students_dir",
        "dtype": "memory.dtype",
        "attn_implementation": "memory.attn_implementation",
        "ref_quantization": "memory.ref_quantization",
        "lora": "memory.lora",
        "student_lora": "memory.student_lora",
        "merge_promoted_adapter": "memory.merge_promoted_adapter",
    },
    "Promotion": {
        "tau": "TeacherMetaRL's promotion.tau (model: init_args: promotion: {tau: ...})",
        "window": "TeacherMetaRL's promotion.window (model: init_args: promotion: {window: ...})",
        "reset_after_promotion": "TeacherMetaRL's promotion.reset_after_promotion (model: init_args: promotion: {reset_after_promotion: ...})",
        "require_improvement": "TeacherMetaRL's promotion.require_improvement (model: init_args: promotion: {require_improvement: ...})",
    },
    "SuffixPolicyDPO": {
        "num_rollouts": "candidates.num_rollouts",
        "include_suffix": "candidates.include_suffix",
        "include_rewrite": "candidates.include_rewrite",
        "max_new_tokens": "candidates.max_new_tokens",
        "temperature": "candidates.temperature",
        "top_p": "candidates.top_p",
        "loss": "objective.loss",
        "beta": "objective.beta",
        "lr": "optim.lr",
        "weight_decay": "optim.weight_decay",
        "warmup_steps": "optim.warmup_steps",
        "min_lr_ratio": "optim.min_lr_ratio",
        "optimizer": "optim.optimizer",
        "grad_clip": "optim.grad_clip",
        "micro_batch_size": "optim.micro_batch_size",
        "val_temperature": "validation.temperature",
        "val_max_new_tokens": "validation.max_new_tokens",
        "max_unparseable_frac": "judge_health.max_unparseable_frac",
        "max_skipped_frac": "judge_health.max_skipped_frac",
        "fail_after_steps": "judge_health.fail_after_steps",
    },
}


class MovedSettingError(SystemExit):
    """An old config or override used a setting that moved (exit status 2, as a parse error)."""

    def __init__(self, messages: list[str]):
        text = "settings that moved (set them where the arrow points):\n" + "\n".join(
            f"  {m}" for m in messages
        )
        super().__init__(text)


def _short(class_path: str) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def moved_in_config(node: Any, where: str = "") -> list[str]:
    """``old -> new`` for every moved init argument of every ``class_path`` block in a loaded config."""
    found: list[str] = []
    if isinstance(node, dict):
        name = _short(node["class_path"]) if "class_path" in node else None
        table = MOVED.get(name or "", {})
        args = node.get("init_args") if isinstance(node.get("init_args"), dict) else {}
        for key in args:
            if key in table:
                found.append(f"{where}{name}.{key} -> {name}: {table[key]}")
        for key, value in node.items():
            found += moved_in_config(value, f"{where}{key}." if name is None else where)
    elif isinstance(node, list):
        for value in node:
            found += moved_in_config(value, where)
    return found


_OVERRIDE = re.compile(r"^--model\.(?:init_args\.)?([A-Za-z_][A-Za-z0-9_]*)(?:[=.].*)?$")


def check_moved_settings(argv: list[str]) -> None:
    """Raise :class:`MovedSettingError` naming each moved setting in the ``--config`` files and the
    ``--model.*`` overrides of a command line (the model's class from ``--model`` or its config)."""
    messages: list[str] = []
    model_class = None
    for i, token in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if token.startswith(("--config=", "-c=")):
            token, value = token.split("=", 1)[0], token.split("=", 1)[1]
        if token in ("--config", "-c") and value and Path(value).is_file():
            config = yaml.safe_load(Path(value).read_text()) or {}
            messages += [f"{value}: {m}" for m in moved_in_config(config)]
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict) and "class_path" in model:
                model_class = _short(model["class_path"])
        elif token == "--model" and value and not value.endswith((".yaml", ".yml")):
            model_class = _short(value)
        elif token.startswith("--model="):
            model_class = _short(token.split("=", 1)[1])
    table = MOVED.get(model_class or "", {})
    for token in argv:
        match = _OVERRIDE.match(token)
        if match and match.group(1) in table:
            messages.append(f"{token.split('=', 1)[0]} -> {model_class}: {table[match.group(1)]}")
    if messages:
        raise MovedSettingError(messages)
