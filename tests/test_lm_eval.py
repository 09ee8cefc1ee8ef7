"""Standard-benchmark evaluation through lm-evaluation-harness, on LOCAL multiple-choice tasks.

The real lm-eval code path runs (task YAML -> ``datasets`` json loader -> HFLM log-likelihoods ->
acc / acc_norm) on the bundled tiny SIP policy, from the function, the CLI and the ``LMEval``
callback in a tiny SuffixPolicyDPO fit. The tasks are written under tmp_path from the tiny facts
world: ``tiny_argmax`` takes as answer the choice the model itself gives the highest
log-likelihood (so acc must be 1.0), ``tiny_mixed`` has fixed answers whose acc / acc_norm are
recomputed here directly with the model.
"""

from __future__ import annotations

import csv
import json
import math
import random
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")

from lit_selfimprove.callbacks import LMEval  # noqa: E402
from lit_selfimprove.cli import main  # noqa: E402
from lit_selfimprove.evaluation import LMEvalError, evaluate_model, evaluate_path, load_eval_model  # noqa: E402
from lit_selfimprove.evaluation.lm_eval_adapter import _is_network_error, dataset_error  # noqa: E402
from tests.helpers import ASSETS, REPO, needs_assets  # noqa: E402

pytestmark = needs_assets("tiny-sip-policy", "tiny-facts")

MODEL, TOKENIZER = "builtin:tiny-sip-policy", "builtin:tiny-tokenizer"
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""


def choice_logprobs(model, tok, question: str, choices: list[str]) -> list[float]:
    """Sum log-prob of ``" " + choice`` after ``question`` (BOS first, as the tokenizer encodes it):
    what lm-eval's loglikelihood request computes for a multiple-choice document."""
    out = []
    for choice in choices:
        ids = tok(question + " " + choice, return_tensors="pt").input_ids
        n = len(tok(" " + choice, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        out.append(float(logp[-n:].gather(-1, targets[-n:, None]).sum()))
    return out


def _questions() -> list[dict]:
    """20 questions about the tiny world's people (city / job / colour), 2-4 choices each."""
    world = json.loads((ASSETS / "tiny-facts" / "world.json").read_text())["facts"]
    kinds = [("city", "lives in"), ("job", "is a"), ("color", "wears")]
    values = {k: sorted({f[k] for f in world.values()}) for k, _ in kinds}
    rng = random.Random(0)
    rows = []
    for i, (name, facts) in enumerate(list(world.items())[:20]):
        key, verb = kinds[i % 3]
        others = rng.sample([v for v in values[key] if v != facts[key]], 1 + i % 3)
        choices = [facts[key], *others]
        rng.shuffle(choices)
        rows.append({"question": f"{name} {verb}", "choices": choices, "truth": choices.index(facts[key])})
    return rows


def _write_task(folder: Path, name: str, rows: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, cache=folder / "hf_cache"))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    """The task folder, the model's per-document log-likelihoods and the expected accuracies."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    model, tok = load_eval_model(MODEL, tokenizer=TOKENIZER, device="cpu")
    rows = _questions()
    expected = {"acc": 0.0, "acc_norm": 0.0}
    argmax_rows, mixed_rows = [], []
    for i, r in enumerate(rows):
        lls = choice_logprobs(model, tok, r["question"], r["choices"])
        best = max(range(len(lls)), key=lls.__getitem__)
        best_norm = max(range(len(lls)), key=lambda j: lls[j] / len(r["choices"][j]))
        argmax_rows.append({"question": r["question"], "choices": r["choices"], "label": best})
        if i < 10:  # fixed answers: the truth, or for every third question a wrong choice
            label = r["truth"] if i % 3 else (r["truth"] + 1) % len(r["choices"])
            mixed_rows.append({"question": r["question"], "choices": r["choices"], "label": label})
            expected["acc"] += (best == label) / 10
            expected["acc_norm"] += (best_norm == label) / 10
    _write_task(folder, "tiny_argmax", argmax_rows)
    _write_task(folder, "tiny_mixed", mixed_rows)
    return {"folder": str(folder), "mixed": expected, "model": model, "tok": tok}


def _check_summary(summary: dict, names: list[str]) -> None:
    assert list(summary["tasks"]) == names
    for e in summary["tasks"].values():
        for key in ("acc", "acc_norm", "score"):
            assert 0.0 <= e[key] <= 1.0
        assert e["metric"] == "acc_norm" and e["score"] == e["acc_norm"]  # auto: acc_norm when reported
        assert e["acc_stderr"] >= 0
    scores = [e["score"] for e in summary["tasks"].values()]
    assert summary["average"] == pytest.approx(sum(scores) / len(scores))
    assert summary["lm_eval"]["version"]


# ------------------------------------------------------------------------------- the function
def test_function_scores_local_tasks_like_the_model_does(tasks):
    model, tok = tasks["model"], tasks["tok"]
    model.train()  # as during training: put back afterwards
    torch.manual_seed(123)
    summary = evaluate_model(
        model, tok, ["tiny_argmax", "tiny_mixed"], include_path=tasks["folder"], batch_size=4, progress=False
    )
    _check_summary(summary, ["tiny_argmax", "tiny_mixed"])
    argmax, mixed = summary["tasks"]["tiny_argmax"], summary["tasks"]["tiny_mixed"]
    assert (argmax["num_samples"], mixed["num_samples"]) == (20, 10)
    assert argmax["acc"] == 1.0  # every answer is the model's own log-likelihood argmax
    assert mixed["acc"] == pytest.approx(tasks["mixed"]["acc"])  # recomputed above with the model
    assert mixed["acc_norm"] == pytest.approx(tasks["mixed"]["acc_norm"])
    assert 0 < mixed["acc"] < 1  # the wrong labels are not all "right"
    # the training state is untouched: train mode, and the global RNG where it was
    assert model.training
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
    model.eval()


def test_limit_and_metric_choice(tasks):
    summary = evaluate_model(
        tasks["model"],
        tasks["tok"],
        "tiny_mixed",
        include_path=tasks["folder"],
        limit=4,
        metric="acc",
        progress=False,
    )
    entry = summary["tasks"]["tiny_mixed"]
    assert entry["num_samples"] == 4 and entry["metric"] == "acc" and entry["score"] == entry["acc"]
    assert summary["average"] == entry["acc"]


# -------------------------------------------------------------------------------------- the CLI
def test_cli_writes_results(tasks, tmp_path, capsys):
    out = tmp_path / "results.json"
    main(["lm-eval", "--model", MODEL, "--tokenizer", TOKENIZER, "--tasks", "tiny_argmax,tiny_mixed",
          "--include-path", tasks["folder"], "--batch-size", "8", "--device", "cpu", "--output", str(out)])  # fmt: skip
    summary = json.loads(out.read_text())
    _check_summary(summary, ["tiny_argmax", "tiny_mixed"])
    assert summary["tasks"]["tiny_argmax"]["acc"] == 1.0
    assert summary["tasks"]["tiny_mixed"]["acc"] == pytest.approx(tasks["mixed"]["acc"])
    assert summary["model"] == MODEL
    printed = capsys.readouterr().out
    assert "tiny_mixed" in printed and "average" in printed


def test_cli_unknown_task_says_how_to_find_names(tasks, monkeypatch):
    # lm-eval's own index (~15,000 task YAMLs, 7-20 s to build here) stands in for the local one;
    # the slow test below uses the real one
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=[tasks["folder"]], include_defaults=False)
    monkeypatch.setattr(
        "lit_selfimprove.evaluation.lm_eval_adapter._FULL_MANAGERS", {(tasks["folder"],): local}
    )
    _check_unknown_task_message(tasks)


@pytest.mark.slow
def test_cli_unknown_task_with_lm_evals_own_index(tasks):
    _check_unknown_task_message(tasks)


def _check_unknown_task_message(tasks):
    with pytest.raises(SystemExit) as info:
        main(["lm-eval", "--model", MODEL, "--tasks", "siqa,tiny_mixed", "--include-path", tasks["folder"]])
    message = str(info.value.code)
    assert "'siqa'" in message and "social_iqa" in message and "lm-eval ls tasks" in message
    assert "tiny_mixed" not in message.split("did you mean")[0]  # the local task is known


def test_missing_local_dataset_says_it_must_be_local(tmp_path, tasks):
    (tmp_path / "broken.yaml").write_text(
        TASK_YAML.format(name="tiny_broken", data=tmp_path / "missing.jsonl", cache=tmp_path / "cache")
    )
    with pytest.raises(LMEvalError, match="must be local"):
        evaluate_model(
            tasks["model"], tasks["tok"], "tiny_broken", include_path=str(tmp_path), progress=False
        )


def test_network_errors_are_recognised_in_the_cause_chain():
    class LocalEntryNotFoundError(Exception):
        pass

    try:
        try:
            raise LocalEntryNotFoundError("no cache")
        except LocalEntryNotFoundError as inner:
            raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub") from inner
    except ConnectionError as err:
        assert _is_network_error(err)
        assert "HF_DATASETS_OFFLINE=1" in str(dataset_error(["boolq"], err))
    assert not _is_network_error(ValueError("bad"))


def test_bad_arguments():
    with pytest.raises(LMEvalError, match="no tasks"):
        evaluate_model(torch.nn.Linear(1, 1), None, "")
    with pytest.raises(ValueError, match="every_n_val_runs"):
        LMEval(tasks=["boolq"], every_n_val_runs=0)
    with pytest.raises(ValueError, match="metric"):
        LMEval(tasks=["boolq"], metric="f1")
    with pytest.raises(LMEvalError, match="not a folder"):
        evaluate_model(torch.nn.Linear(1, 1), None, "boolq", include_path="/no/such/dir")


# --------------------------------------------------------------- the callback in a tiny SIP fit
def test_callback_logs_lm_eval_metrics_in_a_tiny_sip_fit(tasks, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the tiny config's paths are repo-relative
    cli = main(
        [
            "fit",
            "--config",
            str(REPO / "configs/tiny/sip_dpo.yaml"),
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=lit_selfimprove.callbacks.LMEval",
            "--trainer.callbacks.tasks=[tiny_mixed]",
            f"--trainer.callbacks.include_path={tasks['folder']}",
            "--trainer.callbacks.every_n_val_runs=2",
            "--model.init_args.candidates.num_rollouts=2",
            "--model.init_args.candidates.max_new_tokens=8",
            "--model.init_args.log_samples_every=0",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_val_prefixes=2",
            "--data.init_args.val_batch_size=2",
            "--data.init_args.shuffle_buffer_size=8",
        ]
    )
    trainer, module = cli.trainer, cli.model
    callback = next(c for c in trainer.callbacks if isinstance(c, LMEval))
    assert callback.val_runs == 2  # validations after steps 1 and 2; evaluated at the 2nd only
    log_dir = Path(trainer.log_dir)
    with open(log_dir / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    val_steps = [int(r["step"]) for r in logged if r.get("val/factuality")]
    rows = [r for r in logged if r.get("lm_eval/average")]
    assert len(val_steps) == 2 and len(rows) == 1 and int(rows[0]["step"]) == val_steps[-1]  # with val/*
    score = float(rows[0]["lm_eval/tiny_mixed"])
    assert 0 <= score <= 1 and float(rows[0]["lm_eval/average"]) == score
    jsonl = [json.loads(line) for line in (log_dir / "lm_eval.jsonl").read_text().splitlines()]
    assert len(jsonl) == 1 and jsonl[0]["step"] == 2 and jsonl[0]["average"] == pytest.approx(score)
    assert module.policy.training  # back in train mode for the next step
    # the checkpoint holds the trained policy: the CLI's loader gives back the same weights and scores
    ckpt = next(log_dir.glob("checkpoints/*.ckpt"))
    loaded, _ = load_eval_model(str(ckpt), device="cpu")
    trained = module.policy.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    from_ckpt = evaluate_path(str(ckpt), "tiny_mixed", include_path=tasks["folder"], progress=False)
    assert from_ckpt["tasks"]["tiny_mixed"]["score"] == pytest.approx(score)
    assert math.isfinite(from_ckpt["average"])
    # the same checkpoint in the layout ModelParallelStrategy (FSDP2) writes: a folder of
    # torch.distributed.checkpoint shards + meta.pt with everything else
    import torch.distributed.checkpoint as dcp

    full = torch.load(ckpt, map_location="cpu", weights_only=False)
    folder = tmp_path / "dcp.ckpt"
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process, as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"state_dict": full.pop("state_dict")}, checkpoint_id=folder, no_dist=True)
    full.pop("optimizer_states", None)
    torch.save(full, folder / "meta.pt")
    sharded, _ = load_eval_model(str(folder), device="cpu")
    assert all(torch.equal(v, trained[k]) for k, v in sharded.state_dict().items())
