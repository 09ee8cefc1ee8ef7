"""Step time of ``StudentRLVR`` (inside a real ``lightning.Trainer``) against TRL's ``GRPOTrainer``.

Same tiny causal LM, same prompts, same cheap deterministic reward, on CPU::

    python benchmarks/bench_student_rlvr_vs_trl.py                     # 3 warmup + 15 measured steps
    python benchmarks/bench_student_rlvr_vs_trl.py --steps 30 --warmup 5 --reward mathverify

One step = sample ``--group-size`` completions for each of ``--questions`` questions (16 completions),
score them, one forward of the frozen reference (KL, ``beta`` = ``kl_coef`` = 0.001), one forward and
backward of the policy, gradient clipping and one AdamW step.

Each framework runs in its own process; the parent hands a baton to one process at a time, step by
step (ours, TRL, TRL, ours, ours, TRL, ...: the order alternates each round), and a process only
starts its step once the other one is blocked waiting for its next turn. So both see the same
machine load and never run at the same time. The time of a step is ``time.perf_counter()`` between
Lightning's ``on_train_batch_start`` / ``on_train_batch_end`` (ours) and HF's ``on_step_begin`` /
``on_step_end`` (TRL); both intervals include sampling, scoring, the loss, backward and the
optimizer step.

Writes ``benchmarks/results/student_rlvr_vs_trl.json`` (raw per-step times, settings, versions, CPU)
and prints a markdown table. Both workers use ``--threads`` torch threads (1 by default: only one
worker runs at a time, but other jobs may share the machine). Needs the ``bench`` extra
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "student_rlvr_vs_trl.json"
PROMPT = "Q: {question}\nA: "
FRAMEWORKS = ("ours", "trl")
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------- setup
def build_tiny_model(out_dir: Path) -> str:
    """A random tiny Llama (hidden 128, 4 layers, 4 heads) over the bundled char tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_selfimprove.modeling import load_tokenizer

    tok = load_tokenizer("builtin:tiny-tokenizer")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=384,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def resolve_model(arg: str | None, tmp: Path) -> tuple[str, str]:
    """``(path, description)`` of the model folder both frameworks load."""
    from lit_selfimprove.assets import BUILTINS, resolve

    if arg:
        return resolve(arg), arg
    if BUILTINS["tiny-student"].exists():
        return resolve("builtin:tiny-student"), "builtin:tiny-student"
    return build_tiny_model(tmp / "tiny-llama"), "random tiny Llama (hidden 128, 4 layers, 4 heads, ffn 384)"


def make_problems(n: int, level: int, seed: int) -> list[dict]:
    from lit_selfimprove.datamodules.arithmetic import generate_problems

    return [
        {"question": p["question"], "answer": p["answer"]} for p in generate_problems([level], n, seed=seed)
    ]


def make_reward(kind: str):
    """``reward(completions, answers) -> list[float]``: 1.0 for the right last ``\\boxed{}``."""
    if kind == "mathverify":
        from lit_selfimprove.rewards import MathVerifyReward

        mv = MathVerifyReward(mode="binary")
        return lambda completions, answers: [float(r) for r in mv(completions, answers)]
    from lit_selfimprove.world import quick_correct

    return lambda completions, answers: [
        1.0 if quick_correct(c, a) else 0.0 for c, a in zip(completions, answers)
    ]


# -------------------------------------------------------------------------------------- workers
class Baton:
    """Child side of the step-by-step turn taking with the parent."""

    def __init__(self, conn):
        self.conn = conn
        self.t0 = 0.0

    def begin(self) -> None:
        self.conn.send(("ready",))
        msg = self.conn.recv()
        if msg != "go":
            raise RuntimeError(f"unexpected message from the parent: {msg!r}")
        self.t0 = time.perf_counter()

    def end(self, **extra) -> None:
        dt = time.perf_counter() - self.t0
        self.conn.send(("done", dt, extra))


def _common_init(cfg: dict) -> None:
    import torch

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])


def run_ours(conn, cfg: dict) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lit_selfimprove.modules import StudentRLVR
    from lit_selfimprove.rl.rlvr_step import RLVRConfig

    _common_init(cfg)
    reward_fn = make_reward(cfg["reward"])

    def reward(completions, answers):
        return torch.tensor(reward_fn(completions, answers), dtype=torch.float32)

    baton = Baton(conn)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            baton.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            baton.end(
                completion_len=float(metrics["train/completion_len"]),
                reward=float(metrics["train/reward"]),
            )

    module = StudentRLVR(
        model=cfg["model"],
        tokenizer=cfg["model"],
        reward=reward,
        prompt_template=PROMPT,
        rl=RLVRConfig(
            group_size=cfg["group_size"],
            max_new_tokens=cfg["max_new_tokens"],
            temperature=cfg["temperature"],
            advantage="grpo",  # TRL: scale_rewards="group"
            loss_aggregation="token",  # TRL: loss_type="dapo"
            clip_eps_low=None,  # TRL clips, but with num_iterations=1 its ratio is exactly 1 (see notes)
            ppo_epochs=1,
            kl_coef=cfg["beta"],
            kl_estimator="k3",
            max_grad_norm=1.0,
        ),
        lr=cfg["lr"],
        val_num_samples=0,
        log_samples_every=0,
        dtype="float32",
    )
    loader = DataLoader(cfg["problems"], batch_size=cfg["questions"], shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg["total_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Timer()],
        default_root_dir=cfg["workdir"],
    )
    trainer.fit(module, train_dataloaders=loader)


def run_trl(conn, cfg: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lit_selfimprove.modeling import load_tokenizer

    _common_init(cfg)
    reward_fn = make_reward(cfg["reward"])
    lengths: list[float] = []

    def reward(prompts, completions, completion_ids, answer, **kwargs):
        lengths.append(sum(len(c) for c in completion_ids) / len(completion_ids))
        return reward_fn(completions, answer)

    reward.__name__ = "boxed_answer"
    baton = Baton(conn)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            baton.begin()

        def on_step_end(self, args, state, control, **kwargs):
            baton.end(completion_len=lengths[-1] if lengths else float("nan"))

    dataset = Dataset.from_list(
        [{"prompt": PROMPT.format(question=p["question"]), "answer": p["answer"]} for p in cfg["problems"]]
    )
    n = cfg["group_size"] * cfg["questions"]
    args = GRPOConfig(
        output_dir=cfg["workdir"],
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=cfg["seed"],
        model_init_kwargs={"dtype": torch.float32},
        # one optimizer step per generation of n completions
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=cfg["group_size"],
        max_completion_length=cfg["max_new_tokens"],
        temperature=cfg["temperature"],
        top_p=1.0,
        top_k=0,
        beta=cfg["beta"],
        learning_rate=cfg["lr"],
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # GRPOConfig defaults to True; ours does not checkpoint
        shuffle_dataset=False,  # same prompt order as ours
        max_steps=cfg["total_steps"],
        report_to="none",
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=cfg["model"],
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer(cfg["model"]),
        callbacks=[Timer()],
    )
    trainer.train()


def report_to_parent(conn, run, *args) -> None:
    """Run ``run(*args)`` in a worker process and tell the parent how it ended: ``("result",)``,
    or ``("error", traceback)`` before re-raising; the pipe is closed either way."""
    try:
        run(*args)
        conn.send(("result",))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


def worker_main(name: str, conn, cfg: dict) -> None:
    report_to_parent(conn, run_ours if name == "ours" else run_trl, conn, cfg)


# --------------------------------------------------------------------------------------- parent
class Worker:
    """Parent side of one worker process (``target(name, conn, cfg)``, default :func:`worker_main`)."""

    def __init__(self, name: str, ctx, cfg: dict, timeout: float, target=None):
        self.name, self.timeout = name, timeout
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=target or worker_main, args=(name, child, cfg), name=f"bench-{name}", daemon=True
        )
        self.proc.start()
        child.close()
        self.blocked = False  # waiting for "go"
        self.finished = False
        self.times: list[float] = []
        self.extras: list[dict] = []

    def recv(self):
        if not self.conn.poll(self.timeout):
            raise TimeoutError(f"{self.name}: no message within {self.timeout} s")
        try:
            msg = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: worker died (exit code {self.proc.exitcode})") from None
        if msg[0] == "error":
            raise RuntimeError(f"{self.name} worker failed:\n{msg[1]}")
        return msg

    def settle(self) -> None:
        """Wait until this worker is blocked before its next step (or has finished)."""
        if self.blocked or self.finished:
            return
        msg = self.recv()
        if msg[0] == "ready":
            self.blocked = True
        elif msg[0] == "result":
            self.finished = True
            self.proc.join(timeout=60)  # let it exit before the other worker's next step
        else:
            raise RuntimeError(f"{self.name}: unexpected message {msg!r}")

    def step(self) -> float:
        self.settle()
        if self.finished:
            raise RuntimeError(f"{self.name}: finished before all steps ran")
        self.conn.send("go")
        self.blocked = False
        msg = self.recv()
        if msg[0] != "done":
            raise RuntimeError(f"{self.name}: unexpected message {msg!r}")
        self.times.append(msg[1])
        self.extras.append(msg[2])
        return msg[1]

    def close(self) -> None:
        """Stop the worker: it has normally exited already; otherwise terminate, then kill it."""
        if self.proc.is_alive():
            self.proc.join(timeout=60 if self.finished else 0)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)
        if self.proc.is_alive():  # Lightning traps SIGTERM
            self.proc.kill()
        self.proc.join()


def interleave(workers: dict[str, Worker], steps: int, tag) -> None:
    """Run ``steps`` steps of every worker one at a time, the order reversed each round (a, b, b, a,
    ...), each step starting once every other worker is blocked; ``tag(i)`` labels step ``i``'s log."""
    for w in workers.values():  # all set up (models loaded) before the first step
        w.settle()
    order = list(workers)
    for i in range(steps):
        for name in order:
            for other in workers.values():
                other.settle()
            dt = workers[name].step()
            print(f"[{tag(i)} {i + 1}/{steps}] {name}: {dt:.3f} s", file=sys.stderr, flush=True)
        order.reverse()
    for w in workers.values():
        w.settle()


def summarize(times: list[float]) -> dict:
    s = sorted(times)
    if len(s) >= 2:
        deciles = statistics.quantiles(s, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = s[0]
    return {"median": statistics.median(s), "p10": p10, "p90": p90, "mean": statistics.fmean(s)}


def cpu_info() -> dict:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "model": model,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "lightning", "accelerate", "lit-selfimprove"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder / builtin:NAME (default: see module doc)")
    p.add_argument("--steps", type=int, default=15, help="measured steps per framework")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per framework")
    p.add_argument("--group-size", type=int, default=8, help="completions per question")
    p.add_argument("--questions", type=int, default=2, help="questions per step")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.001, help="KL coefficient (both)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--reward", choices=("quick", "mathverify"), default="quick")
    p.add_argument("--level", type=int, default=3, help="tiny-world problem level (digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in both workers (0: torch's default). 1 by default: on a small shared "
        "machine several threads per worker oversubscribe the cores and make step times erratic",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for any one message")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    total = args.warmup + args.steps
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on SIGTERM too
    with tempfile.TemporaryDirectory(prefix="bench_rlvr_") as tmp_str:
        tmp = Path(tmp_str)
        model_path, model_desc = resolve_model(args.model, tmp)
        problems = make_problems(max(64, total * args.questions), args.level, args.seed)
        base_cfg = {
            "model": model_path,
            "problems": problems,
            "group_size": args.group_size,
            "questions": args.questions,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "beta": args.beta,
            "lr": args.lr,
            "reward": args.reward,
            "seed": args.seed,
            "threads": args.threads,
            "total_steps": total,
        }
        ctx = mp.get_context("spawn")
        load_before = loadavg()
        workers = {}
        try:
            for name in FRAMEWORKS:
                (tmp / name).mkdir()
                workers[name] = Worker(name, ctx, {**base_cfg, "workdir": str(tmp / name)}, args.timeout)
            interleave(workers, total, lambda i: "warmup" if i < args.warmup else "step")
        finally:
            for w in workers.values():
                w.close()
        load_after = loadavg()

    result = {"frameworks": {}}
    for name, w in workers.items():
        measured = w.times[args.warmup :]
        lens = [e["completion_len"] for e in w.extras[args.warmup :]]
        result["frameworks"][name] = {
            "step_times_s": measured,
            "warmup_times_s": w.times[: args.warmup],
            "completion_len_per_step": lens,
            "mean_completion_len": statistics.fmean(lens),
            **summarize(measured),
        }
    ours, trl = result["frameworks"]["ours"], result["frameworks"]["trl"]
    ratio = ours["median"] / trl["median"]
    result.update(
        {
            "median_ratio_ours_over_trl": ratio,
            "goal": "ours <= 1/3 of TRL (ratio <= 0.333)",
            "goal_met": ratio <= 1 / 3,
            "settings": {
                **{k: v for k, v in vars(args).items() if k != "out"},
                "out": str(args.out),
                "model": model_desc,
                "model_path": model_path if args.model else None,
                "completions_per_step": args.group_size * args.questions,
                "prompt_template": PROMPT,
                "ours": "StudentRLVR(rl=RLVRConfig(advantage=grpo, loss_aggregation=token, clip_eps_low=None, ppo_epochs=1, "
                "kl_coef=beta, kl_estimator=k3, max_grad_norm=1.0)) in lightning.Trainer(accelerator=cpu)",
                "trl": "GRPOTrainer(loss_type=dapo, scale_rewards=group, num_iterations=1, steps_per_generation=1, "
                "gradient_accumulation_steps=1, gradient_checkpointing=False, use_cpu=True, bf16=False)",
                "interleaving": "one step at a time, alternating order each round; the idle worker is blocked",
            },
            "versions": versions(),
            "cpu": {**cpu_info(), "loadavg_before": load_before, "loadavg_after": load_after},
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\nStudentRLVR vs TRL GRPOTrainer: {args.group_size * args.questions} completions/step "
        f"({args.questions} questions x {args.group_size}), {args.max_new_tokens} new tokens, CPU, "
        f"{args.steps} measured steps after {args.warmup} warmup\n"
    )
    print("| framework | median step (s) | p10 (s) | p90 (s) | mean completion len (tokens) |")
    print("|---|---|---|---|---|")
    for name, label in (
        ("ours", "lit_selfimprove StudentRLVR"),
        ("trl", f"TRL {versions()['trl']} GRPOTrainer"),
    ):
        r = result["frameworks"][name]
        print(
            f"| {label} | {r['median']:.3f} | {r['p10']:.3f} | {r['p90']:.3f} | {r['mean_completion_len']:.1f} |"
        )
    print(f"\nmedian ratio ours/TRL: {ratio:.3f} (goal <= 0.333: {'met' if ratio <= 1 / 3 else 'NOT met'})")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
