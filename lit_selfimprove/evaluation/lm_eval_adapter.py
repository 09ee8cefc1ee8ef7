"""lm-evaluation-harness (``lm-eval``) on a causal LM in memory: the adapter that every evaluation here
goes through (the ``lm-eval`` command, :mod:`~lit_selfimprove.evaluation.lm_eval_cli`, and the
``LMEval`` callback during training).

lm-eval's ``HFLM`` wraps the loaded (or training) model and its tokenizer, nothing is downloaded for
the model. The Self-Improving Pretraining paper reports BoolQ, PIQA, SIQA, HellaSwag, ARC-e / ARC-c,
OBQA and MMLU after SIP (average +3.2 over the next-token baseline); their lm-eval names are
:data:`PAPER_TASKS` (SIQA is ``social_iqa``).

Task datasets are loaded by lm-eval (``datasets.load_dataset``): without network access a task's
dataset must be local, in the datasets cache or given by a task YAML of your own
(``--include-path DIR``), e.g. a multiple-choice jsonl::

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: label
    metric_list: [{metric: acc}, {metric: acc_norm}]

Scores: per task ``acc`` and ``acc_norm`` (lm-eval's length-normalised accuracy) when the task
reports them; ``score`` is ``acc_norm`` where reported, else ``acc`` (``metric="auto"``), or the
metric asked for; ``average`` is the mean score over the tasks asked for (a group such as
``mmlu`` counts once, with lm-eval's aggregate over its subtasks).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

PAPER_TASKS = (
    "boolq",
    "piqa",
    "social_iqa",
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "mmlu",
)
# names a reader of the paper may type, and lm-eval's (suggested, never substituted)
ALIASES = {
    "siqa": "social_iqa",
    "arc-e": "arc_easy",
    "arc_e": "arc_easy",
    "arc-c": "arc_challenge",
    "arc_c": "arc_challenge",
    "arc": "arc_easy,arc_challenge",
    "obqa": "openbookqa",
}
METRICS = ("auto", "acc", "acc_norm")
INSTALL_HINT = "pip install 'lit-selfimprove[eval]' (or pip install lm-eval)"
LIST_HINT = (
    "list lm-eval's task names with `lm-eval ls tasks` (e.g. boolq, piqa, social_iqa, hellaswag, "
    "arc_easy, arc_challenge, openbookqa, mmlu); a task YAML of your own needs --include-path DIR "
    "(include_path=...) naming its folder"
)
# exception classes (by name, anywhere in the cause chain) that mean "could not reach the hub"
_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "DatasetNotFoundError",
    "RepositoryNotFoundError",
    "HfHubHTTPError",
    "HTTPError",
    "MaxRetryError",
    "NameResolutionError",
    "Timeout",
}


class LMEvalError(RuntimeError):
    """An evaluation that cannot run as asked (unknown task, unreachable dataset, bad checkpoint)."""


def require_lm_eval():
    """The ``lm_eval`` package, or an ``ImportError`` saying how to install it."""
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(
            f"standard-benchmark evaluation needs lm-evaluation-harness: {INSTALL_HINT}"
        ) from err
    return lm_eval


def split_names(value: str | Sequence[str] | None) -> list[str]:
    """Names given as ``"a,b"`` or a sequence, as a list (stripped, empty ones dropped)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [s.strip() for s in items if s and s.strip()]


_FULL_MANAGERS: dict[tuple[str, ...], Any] = {}


def task_manager(tasks: Sequence[str], include_path: str | Sequence[str] | None = None):
    """lm-eval's ``TaskManager`` for ``tasks``: only the ``include_path`` folders when they hold
    every task (indexing lm-eval's own ~15,000 task YAMLs takes seconds), else with lm-eval's
    tasks too. Raises :class:`LMEvalError` naming the unknown tasks."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = split_names(include_path)
    for p in paths:
        if not Path(p).expanduser().is_dir():
            raise LMEvalError(f"include_path {p!r} is not a folder (it should hold task YAML files)")
    paths = [str(Path(p).expanduser()) for p in paths]
    manager = None
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            manager = local
    if manager is None:  # the full index is kept: building it again would cost the same seconds
        key = tuple(paths)
        if key not in _FULL_MANAGERS:
            _FULL_MANAGERS[key] = TaskManager(include_path=paths or None)
        manager = _FULL_MANAGERS[key]
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        hints = []
        for t in unknown:
            close = [ALIASES[t]] if t in ALIASES else difflib.get_close_matches(t, manager.all_tasks, n=3)
            hints.append(f"{t!r}" + (f" (did you mean {' / '.join(close)}?)" if close else ""))
        raise LMEvalError(f"unknown lm-eval task(s): {', '.join(hints)}. {LIST_HINT}")
    return manager


def _is_network_error(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in _NETWORK_ERRORS:
            return True
        err = err.__cause__ or err.__context__
    return False


def dataset_error(tasks: Sequence[str], err: BaseException) -> LMEvalError:
    """The error for a task dataset that could not be loaded (no network: it must be local)."""
    return LMEvalError(
        f"could not load the dataset of a task in {list(tasks)} ({type(err).__name__}: {err}). lm-eval "
        "downloads task datasets from the Hugging Face hub; without network access each task's dataset "
        "must be local: in the datasets cache (load the task once where the hub is reachable, then run "
        "with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1), or a task YAML of your own with "
        "`dataset_path: json` and `dataset_kwargs: {data_files: ...}` given with --include-path"
    )


@contextlib.contextmanager
def _kept_state(model: torch.nn.Module, quiet: bool) -> Iterator[None]:
    """Restore the global RNGs (lm-eval reseeds python, numpy and torch) and the model's train mode
    afterwards; with ``quiet``, lm-eval logs errors only."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    training = model.training
    log = logging.getLogger("lm_eval")
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    hf_log.addFilter(_in_memory_notice)
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        model.train(training)
        log.setLevel(level)
        hf_log.removeFilter(_in_memory_notice)


def _in_memory_notice(record: logging.LogRecord) -> bool:
    """Drop HFLM's notices about an already-loaded model: passing one is what this module does."""
    text = str(record.msg)
    return not text.startswith(
        ("`pretrained` model kwarg is not of type", "Passed an already-initialized model")
    )


_HFLM_CLASSES: dict[bool, type] = {}


def _hflm_class(progress: bool) -> type:
    """lm-eval's ``HFLM``, or without ``progress`` a subclass whose request loops show no tqdm bar."""
    if progress not in _HFLM_CLASSES:
        from lm_eval.models.huggingface import HFLM

        if progress:
            _HFLM_CLASSES[progress] = HFLM
        else:

            class QuietHFLM(HFLM):
                def loglikelihood(self, requests, disable_tqdm: bool = False):
                    return super().loglikelihood(requests, disable_tqdm=True)

                def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
                    return super().loglikelihood_rolling(requests, disable_tqdm=True)

                def generate_until(self, requests, disable_tqdm: bool = False):
                    return super().generate_until(requests, disable_tqdm=True)

            _HFLM_CLASSES[progress] = QuietHFLM
    return _HFLM_CLASSES[progress]


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    include_path: str | Sequence[str] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    metric: str = "auto",
    max_length: int | None = None,
    progress: bool = True,
    seed: int = 0,
    log_samples: bool = False,
) -> dict[str, Any] | None:
    """Evaluate an in-memory causal LM on lm-eval ``tasks``; returns :func:`summarize`'s dict.

    Args:
        model: a transformers causal LM (a training policy too: its train mode and the global RNG
            states are restored afterwards).
        tokenizer: its tokenizer (instance).
        tasks: lm-eval task / group names (a list or ``"a,b"``; glob patterns work).
        include_path: folder(s) of task YAMLs of your own.
        limit: at most this many documents per task (a float < 1: that share of them).
        batch_size: requests per forward.
        num_fewshot: few-shot examples (``None``: each task's default, 0 for most).
        metric: ``auto`` (``acc_norm`` where the task reports it, else ``acc``), ``acc`` or
            ``acc_norm``: the per-task ``score`` that ``average`` averages.
        max_length: context length (``None``: from the model's config).
        progress: lm-eval's progress bars and warnings.
        seed: lm-eval's python / numpy / torch / few-shot seeds.
        log_samples: keep lm-eval's per-document records under ``"samples"``.

    Returns ``None`` on a process lm-eval does not report from (``LOCAL_RANK`` != 0).

    Raises:
        LMEvalError: an unknown task (with how to find the names) or a dataset that cannot be loaded
            (without network access it must be local).
        ImportError: lm-eval is not installed.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate

    task_list = split_names(tasks)
    if not task_list:
        raise LMEvalError(f"no tasks given; {LIST_HINT}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    manager = task_manager(task_list, include_path)
    hflm = _hflm_class(progress)
    start = time.perf_counter()
    with _kept_state(model, quiet=not progress), torch.no_grad():
        lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        try:
            results = simple_evaluate(
                model=lm,
                tasks=task_list,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                log_samples=log_samples,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except Exception as err:
            if _is_network_error(err) or isinstance(err, FileNotFoundError):
                raise dataset_error(task_list, err) from err
            raise
    if results is None:
        return None
    summary = summarize(results, task_list, metric)
    summary.update(limit=limit, num_fewshot=num_fewshot, seconds=round(time.perf_counter() - start, 2))
    if log_samples:
        summary["samples"] = results.get("samples")
    return summary


def _metric(values: dict[str, Any], name: str) -> float | None:
    """``name`` from lm-eval's ``"<metric>,<filter>"`` keys (the ``none`` filter first)."""
    keys = [f"{name},none"] + sorted(k for k in values if k.startswith(name + ","))
    for key in keys:
        v = values.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def summarize(results: dict[str, Any], tasks: Sequence[str], metric: str = "auto") -> dict[str, Any]:
    """Per requested task ``acc`` / ``acc_stderr`` / ``acc_norm`` / ``acc_norm_stderr``, the
    ``score`` (see :func:`evaluate_model`'s ``metric``) and ``num_samples``, the ``average`` score
    over the tasks that have one, and lm-eval's own per-task results and versions (``lm_eval``)."""
    import lm_eval

    per_task = dict(results.get("results") or {})
    groups = dict(results.get("groups") or {})
    subtasks = dict(results.get("group_subtasks") or {})
    n_samples = dict(results.get("n-samples") or {})
    out: dict[str, dict[str, Any]] = {}
    for name in tasks:
        names = [name] if (name in per_task or name in groups) else list(subtasks.get(name) or [])
        if not names:  # a glob pattern: every leaf result it matches
            import fnmatch

            names = [t for t in per_task if fnmatch.fnmatch(t, name)]
        if not names:
            raise LMEvalError(f"lm-eval returned no result for {name!r} (results for: {sorted(per_task)})")
        rows = [{**per_task.get(n, {}), **groups.get(n, {})} for n in names]
        entry: dict[str, Any] = {}
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            vals = [_metric(r, key) for r in rows]
            entry[key] = sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None
        chosen = ("acc_norm" if entry["acc_norm"] is not None else "acc") if metric == "auto" else metric
        entry["metric"], entry["score"] = chosen, entry[chosen]
        counts = [n_samples.get(n, {}).get("effective") for n in names]
        entry["num_samples"] = sum(counts) if counts and all(isinstance(c, int) for c in counts) else None
        out[name] = entry
    scores = [e["score"] for e in out.values() if e["score"] is not None]
    return {
        "tasks": out,
        "average": sum(scores) / len(scores) if scores else None,
        "metric": metric,
        "lm_eval": {
            "version": getattr(lm_eval, "__version__", None),
            "results": per_task,
            "groups": groups,
            "versions": results.get("versions"),
            "n-samples": n_samples,
        },
    }
