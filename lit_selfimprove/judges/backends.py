"""Chat backends that the LLM judges and the rewriter send their prompts to.

A backend turns a batch of user prompts into ``n`` answers each (:class:`ChatBackend`). Two are
provided:

* :class:`HFChatBackend`: a local Hugging Face causal LM (frozen, eval mode, no grad), sampled
  with the repo's own KV-cached sampler; prompts are wrapped in the chat template when the
  tokenizer has one.
* :class:`OpenAIChatBackend`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, TGI,
  llama.cpp, SGLang serving e.g. GPT-OSS-120B). Requests run concurrently; failed requests are
  retried with capped exponential backoff by this class (the client's own retries are off, so
  each retry is counted in :attr:`OpenAIChatBackend.stats`). An endpoint that stays down raises
  :class:`JudgeEndpointError`: a training run must stop rather than learn from missing verdicts.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Protocol, runtime_checkable

import torch

from lit_selfimprove.distributed import world

__all__ = ["ChatBackend", "HFChatBackend", "JudgeEndpointError", "OpenAIChatBackend"]


@runtime_checkable
class ChatBackend(Protocol):
    def complete(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
    ) -> list[list[str]]:
        """``n`` answer texts for each user prompt, in the order of ``prompts``."""
        ...


class JudgeEndpointError(RuntimeError):
    """The judge endpoint could not answer (down, unreachable, refusing the request)."""


def _check_sampling(n: int, temperature: float, top_p: float, max_tokens: int) -> None:
    if n < 1 or max_tokens < 1:
        raise ValueError(f"n and max_tokens must be >= 1 (got n={n}, max_tokens={max_tokens})")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")


class HFChatBackend:
    """A local Hugging Face causal LM as a chat backend (frozen; loaded on first use).

    Args:
        model: hub id, local folder or ``builtin:NAME`` (see :func:`lit_selfimprove.modeling.load_causal_lm`).
        tokenizer: tokenizer to load (defaults to ``model``).
        dtype: ``float32`` (CPU), ``bfloat16``, ``float16`` or ``auto``.
        device: e.g. ``cuda:1``; ``None``: the current CUDA device (each rank's own under
            Lightning, since the model is loaded on the first call) or the CPU.
        use_chat_template: wrap prompts as a user turn of the tokenizer's chat template (only
            when the tokenizer has one; base models get the raw prompt).
        max_prompt_tokens: keep at most this many prompt tokens, cut from the left so that the
            question at the end of the prompt survives (``None``: no cut).
        batch_size: prompts per generation call (each expanded ``n`` times).
        seed: seed of the backend's own sampling generator.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``flash_attention_2``).
        quantization: load the frozen model in ``4bit`` (computing in ``dtype``) or ``8bit``
            (LLM.int8()), or with ``BitsAndBytesConfig`` kwargs; bitsandbytes (``gpu`` extra), CPU or
            GPU. The weights are quantized as they load, directly on ``device``.
        generation: sampling backend (``GenerationConfig`` or its dict, e.g. ``{backend: vllm}``);
            default: the built-in sampler.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        use_chat_template: bool = True,
        max_prompt_tokens: int | None = None,
        batch_size: int = 8,
        seed: int = 0,
        attn_implementation: str | None = None,
        quantization: str | dict | None = None,
        generation: dict | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        from lit_selfimprove.modeling import check_attn_implementation, check_quantization

        check_attn_implementation(attn_implementation)  # now, not at the first (lazy) load
        check_quantization(quantization)
        self.model_name = model
        self.tokenizer_name = tokenizer or model
        self.dtype = dtype
        self.device = device
        self.use_chat_template = use_chat_template
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.attn_implementation = attn_implementation
        self.quantization = quantization
        self.generation = generation
        self.model: torch.nn.Module | None = None
        self.tokenizer = None
        self._generator: torch.Generator | None = None
        self._strip_bos: str | None = None
        self.stats: dict[str, float] = {"prompts": 0, "completions": 0}

    def load(self) -> HFChatBackend:
        """Load (once) the frozen model and its tokenizer onto the device."""
        if self.model is not None:
            return self
        from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

        device = self.device
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        tok = load_tokenizer(self.tokenizer_name)
        tok.truncation_side = "left"
        model = load_causal_lm(
            self.model_name,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            quantization=self.quantization,
            device_map={"": str(device)} if self.quantization else None,  # quantized where it loads
        )
        model.eval()
        model.requires_grad_(False)
        if not self.quantization:
            model.to(device)
        self.model, self.tokenizer = model, tok
        if self.generation:
            from lit_selfimprove.generation import attach_backend

            attach_backend(model, self.generation)
        # one stream per rank: ranks judge different data and must not share random draws
        _, rank = world()
        gen = torch.Generator(device=next(model.parameters()).device)
        self._generator = gen.manual_seed((self.seed + 1_000_003 * rank) % 2**63)
        # A chat template usually writes the BOS token itself and the tokenizer adds another one.
        bos = tok.bos_token
        if self._has_template() and bos and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
            self._strip_bos = bos
        return self

    def _has_template(self) -> bool:
        return self.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def format_prompt(self, prompt: str) -> str:
        """The text the model sees: the chat-template user turn, or the prompt itself."""
        self.load()
        if not self._has_template():
            return prompt
        from lit_selfimprove.prompts import as_user_turn

        text = as_user_turn(self.tokenizer, prompt, True)
        if self._strip_bos and text.startswith(self._strip_bos):
            text = text[len(self._strip_bos) :]
        return text

    @torch.no_grad()
    def complete(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
    ) -> list[list[str]]:
        """``n`` sampled answers per prompt (``temperature=0``: greedy, all ``n`` alike)."""
        from lit_selfimprove.generation import generate

        _check_sampling(n, temperature, top_p, max_tokens)
        if not prompts:
            return []
        self.load()
        out: list[list[str]] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = [self.format_prompt(p) for p in prompts[start : start + self.batch_size]]
            rollouts = generate(
                self.model,
                self.tokenizer,
                prompts=chunk,
                num_samples=n,
                max_new_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                generator=self._generator,
                sync_ranks=False,  # the judge is not sharded: ranks need not step together
                max_prompt_tokens=self.max_prompt_tokens,
            )
            out.extend(rollouts.texts[i * n : (i + 1) * n] for i in range(len(chunk)))
        self.stats["prompts"] += len(prompts)
        self.stats["completions"] += len(prompts) * n
        return out


def _status_code(err: BaseException) -> int | None:
    code = getattr(err, "status_code", None)
    return code if isinstance(code, int) else None


def _retryable(err: BaseException) -> bool:
    """Connection errors, timeouts, 408/409/429 and 5xx are worth retrying; other 4xx are not."""
    code = _status_code(err)
    if code is None:
        return True
    return code in (408, 409, 429) or code >= 500


def _describe(err: BaseException) -> str:
    code = _status_code(err)
    text = f"{type(err).__name__}: {err}".strip()
    return f"HTTP {code} ({text})" if code is not None and str(code) not in text else text


class OpenAIChatBackend:
    """An OpenAI-compatible chat-completions endpoint as a chat backend.

    Args:
        base_url: e.g. ``http://localhost:8000/v1``.
        model: the served model name (e.g. ``openai/gpt-oss-120b``).
        api_key: key sent as a bearer token; ``None``: the ``api_key_env`` environment
            variable, else ``"EMPTY"`` (what local servers accept).
        api_key_env: environment variable read when ``api_key`` is ``None``.
        concurrency: requests in flight at once.
        timeout: seconds per request.
        max_retries: retries per request after the first attempt (connection errors,
            timeouts, HTTP 408/409/429/5xx); other HTTP errors (400, 401, 404) fail at once.
        backoff: first retry delay in seconds, doubled each retry, at most ``max_backoff``.
        max_backoff: the cap of the retry delay.
        use_n_param: ask for ``n`` answers in one request (``n`` parameter); the default sends
            ``n`` requests, which every server supports.
        extra_body: extra JSON fields of each request (e.g. ``{"reasoning_effort": "low"}`` or
            vLLM's ``{"top_k": 20}``).
        system_prompt: an optional system message before each prompt.

    Raises :class:`JudgeEndpointError` (naming the URL and the last error) when a request still
    fails after its retries. :attr:`stats` counts ``requests`` (HTTP attempts), ``retries``,
    ``failures`` (failed attempts), ``errors`` (requests given up), ``completions`` and tokens.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        use_n_param: bool = False,
        extra_body: dict[str, Any] | None = None,
        system_prompt: str | None = None,
    ):
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout > 0, backoff >= 0")
        self.base_url = base_url
        self.model = model
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env) or "EMPTY"
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.use_n_param = use_n_param
        self.extra_body = dict(extra_body or {})
        self.system_prompt = system_prompt
        self._client = None
        self._lock = threading.Lock()
        self.stats: dict[str, float] = {
            "requests": 0,
            "retries": 0,
            "failures": 0,
            "errors": 0,
            "completions": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIChatBackend(base_url={self.base_url!r}, model={self.model!r})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self):
        """The ``openai.OpenAI`` client (created on first use, without its own retries)."""
        if self._client is None:
            try:
                import openai
            except ImportError as err:
                raise ImportError("OpenAIChatBackend needs openai: pip install 'openai>=1.40'") from err
            self._client = openai.OpenAI(
                base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0
            )
        return self._client

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for key, value in deltas.items():
                self.stats[key] = self.stats.get(key, 0) + value

    def _request(self, prompt: str, n: int, sampling: dict[str, Any], abort: threading.Event) -> list[str]:
        """One chat completion with ``n`` choices, retried; raises :class:`JudgeEndpointError`."""
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        kwargs: dict[str, Any] = dict(model=self.model, messages=messages, **sampling)
        if n > 1:
            kwargs["n"] = n
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        last: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            if abort.is_set():
                raise JudgeEndpointError(f"judge endpoint {self.base_url}: cancelled after another failure")
            if attempt > 0:
                self._count(retries=1)
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                if abort.wait(delay):
                    raise JudgeEndpointError(
                        f"judge endpoint {self.base_url}: cancelled after another failure"
                    )
            self._count(requests=1)
            try:
                response = self.client.chat.completions.create(**kwargs)
                texts = [(choice.message.content or "") for choice in response.choices or []]
                if len(texts) != n:
                    raise JudgeEndpointError(f"expected {n} choice(s), got {len(texts)}")
            except Exception as err:  # noqa: BLE001 - every failure is retried or reported below
                last = err
                self._count(failures=1)
                if not _retryable(err):
                    break
                continue
            usage = getattr(response, "usage", None)
            self._count(
                completions=n,
                prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            )
            return texts
        self._count(errors=1)
        tries = "after 1 attempt" if attempt == 0 else f"after {attempt + 1} attempts"
        raise JudgeEndpointError(
            f"judge endpoint {self.base_url} (model {self.model!r}) failed {tries}; "
            f"last error: {_describe(last)}"
        ) from last

    def complete(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
    ) -> list[list[str]]:
        """``n`` answers per prompt, in input order; raises :class:`JudgeEndpointError` when down."""
        _check_sampling(n, temperature, top_p, max_tokens)
        if not prompts:
            return []
        sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        # (prompt index, choices asked) per request: one request of n, or n requests of 1
        jobs = [(i, n) for i in range(len(prompts))] if self.use_n_param or n == 1 else None
        if jobs is None:
            jobs = [(i, 1) for i in range(len(prompts)) for _ in range(n)]
        abort = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs)))
        futures = [pool.submit(self._request, prompts[i], k, sampling, abort) for i, k in jobs]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in futures if f.done() and f.exception() is not None]
        if failed:
            # stop the other requests (no new attempts) and do not wait for those in flight
            abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise failed[0]
        pool.shutdown(wait=True)
        out: list[list[str]] = [[] for _ in prompts]
        for (i, _), future in zip(jobs, futures):
            out[i].extend(future.result())
        return out
