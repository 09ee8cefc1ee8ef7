"""The SOAR -> SIP loop in one command: SOAR writes a curriculum, SIP's judge and rewriter purify it, the
policy pretrains on the result.

    python -m lit_selfimprove soar-sip --run-dir runs/soar_sip                      # the tiny world
    python -m lit_selfimprove soar-sip --run-dir runs/soar_sip --ckpt_path=last     # resume after a crash

Four stages, each kept in the run directory:

1. ``soar/version_0``: ``fit --config SOAR_CONFIG`` (TeacherMetaRL; PQ file, teacher samples of every
   outer step, promoted students, checkpoints);
2. ``corpus.jsonl``: SOAR's questions (PQ, then the teacher samples, then ``--extra-questions`` files such
   as ``sample-questions`` output; each question once) rendered as
   documents by :mod:`~lit_selfimprove.datamodules.soar_corpus`, with the solution of the last promoted
   student (the base student when SOAR never promoted) or the teacher's answer (``--solutions``);
   ``--keep agree`` keeps only student solutions whose answer agrees with the teacher's;
   ``corpus.summary.json`` counts them;
3. ``sip/version_0``: ``fit --config SIP_CONFIG`` (SuffixPolicyDPO) on ``corpus.jsonl``; when the SIP
   config's rewriter is a :class:`~lit_selfimprove.judges.ModelRewriter`, it is the corpus's student
   (SOAR's promoted student re-solves each question);
4. ``eval/version_0``: ``validate --config EVAL_CONFIG`` with the trained SIP policy (``sip/version_0/hf``)
   as the model: greedy accuracy and pass@k on that config's test set (the tiny strict hard test set by
   default); the values are also in ``loop.json`` (``--no-eval`` skips it).

Each stage runs the ``python -m lit_selfimprove fit`` command line as a subprocess (shown before it starts;
``--soar=OVERRIDE`` / ``--sip=...`` / ``--eval=...``, repeatable, replace a stage's default overrides), with
the seed of ``--seed``. ``loop.json`` records the finished
stages. ``--ckpt_path=last`` skips them and resumes the stage that was running from its last checkpoint
(both stage configs must write one: ``ModelCheckpoint(save_last=True)``); a stage that died before its
first checkpoint starts over. A fresh command into a run directory that has a loop refuses to overwrite it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

__all__ = ["STAGES", "main", "promoted_student", "run_loop"]

STAGES = ("soar", "corpus", "sip", "eval")
STATE = "loop.json"
# each stage's overrides when none are given: teacher samples at every outer step (the whole
# curriculum); the eval config's student trains on D_train alone (no PQ file to find)
SOAR_SIP_DEFAULTS = {
    "soar": ["--model.init_args.log_samples_every=1"],
    "sip": [],
    "eval": ["--data.init_args.extra_train_sources=null"],
}


def promoted_student(soar_run: Path) -> Path | None:
    """The last promoted student's folder of a SOAR run (``students/promotion_<i>_step_<s>``), or None."""
    folders = [p for p in (soar_run / "students").glob("promotion_*_step_*") if p.is_dir()]
    return max(folders, key=lambda p: int(p.name.split("_")[1])) if folders else None


def _config_model(config: Path) -> dict:
    data = yaml.safe_load(Path(config).read_text()) or {}
    return (data.get("model") or {}).get("init_args") or {}


def _fit(
    config: Path, run_dir: Path, name: str, seed: int, extra: list[str], resume: bool, subcommand: str = "fit"
) -> list[str]:
    """The ``fit`` (or ``validate``) command of a stage, its outputs in ``run_dir/name/version_0``."""
    stage_dir = run_dir / name / "version_0"
    last = stage_dir / "checkpoints" / "last.ckpt"
    cmd = [
        sys.executable, "-m", "lit_selfimprove", subcommand, "--config", str(config),
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        f"--trainer.logger.init_args.name={name}",
        "--trainer.logger.init_args.version=0",
        *extra,
    ]  # fmt: skip
    if resume and last.is_file() and subcommand == "fit":
        cmd.append("--ckpt_path=last")
    elif stage_dir.exists():  # died before its first checkpoint: nothing to resume, start over
        shutil.rmtree(stage_dir)
    return cmd


def _last_metrics(csv_path: Path) -> dict[str, float]:
    """The last logged value of every ``val/`` metric of a metrics.csv."""
    from lit_selfimprove.callbacks.metrics_plot import read_metrics_csv

    return {k: v[-1][1] for k, v in read_metrics_csv(csv_path).items() if k.startswith("val/")}


def _run(cmd: list[str], stage: str) -> None:
    print(f"[soar-sip] {stage}: {shlex.join(cmd)}", flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise SystemExit(
            f"[soar-sip] stage {stage!r} failed (exit status {code}); fix the cause and rerun the same "
            "command with --ckpt_path=last to resume it"
        )


def _corpus(run_dir: Path, args, soar_run: Path) -> dict:
    from lit_selfimprove.datamodules.soar_corpus import build_corpus, load_soar_rows, write_corpus

    rows = load_soar_rows(soar_run, part="all")
    seen = {r["question"] for r in rows}
    for extra in args.extra_questions or []:  # e.g. sample-questions from the trained teacher (Grounded-T)
        for row in load_soar_rows(extra):
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
    student = promoted_student(soar_run)
    student_name = str(student) if student else _config_model(args.soar_config).get("student")
    docs, summary = build_corpus(
        rows, args.keep, solutions=args.solutions, max_new_tokens=args.max_new_tokens,
        student=student_name if args.solutions == "student" else None, student_prompt=args.student_prompt,
    )  # fmt: skip
    write_corpus(docs, run_dir / "corpus.jsonl")
    summary = {
        **summary,
        "solutions": args.solutions,
        "student": student_name,
        "promoted": student is not None,
    }
    (run_dir / "corpus.summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[soar-sip] corpus: {json.dumps(summary)}", flush=True)
    return summary


def run_loop(args) -> dict:
    """Run (or resume) the three stages; returns ``loop.json``'s content."""
    run_dir = Path(args.run_dir)
    state_file = run_dir / STATE
    resume = args.ckpt_path == "last"
    if state_file.is_file() and not resume:
        raise SystemExit(
            f"[soar-sip] {run_dir} already holds a loop ({state_file}); resume it with --ckpt_path=last "
            "or choose another --run-dir"
        )
    if resume and not state_file.is_file():
        raise SystemExit(f"[soar-sip] nothing to resume: no {state_file}")
    run_dir.mkdir(parents=True, exist_ok=True)
    state = json.loads(state_file.read_text()) if resume else {"done": [], "command": sys.argv, "seconds": {}}

    def finish(stage: str, t0: float) -> None:
        state["done"].append(stage)
        state["seconds"][stage] = round(time.time() - t0, 1)
        state_file.write_text(json.dumps(state, indent=2))

    state_file.write_text(json.dumps(state, indent=2))
    soar_run = run_dir / "soar" / "version_0"
    if "soar" not in state["done"]:
        t0 = time.time()
        _run(_fit(args.soar_config, run_dir, "soar", args.seed, args.soar, resume), "soar")
        finish("soar", t0)
    if "corpus" not in state["done"]:
        t0 = time.time()
        state["corpus"] = _corpus(run_dir, args, soar_run)
        finish("corpus", t0)
    if "sip" not in state["done"]:
        t0 = time.time()
        extra = [f"--data.init_args.sources=[{run_dir / 'corpus.jsonl'}]"]
        rewriter = _config_model(args.sip_config).get("rewriter") or {}
        if str(rewriter.get("class_path", "")).endswith("ModelRewriter"):
            extra.append(f"--model.init_args.rewriter.init_args.model={state['corpus']['student']}")
        _run(_fit(args.sip_config, run_dir, "sip", args.seed, extra + args.sip, resume), "sip")
        finish("sip", t0)
    if "eval" not in state["done"] and args.eval_config is not None:
        t0 = time.time()
        extra = [f"--model.init_args.model={run_dir / 'sip' / 'version_0' / 'hf'}", *args.eval]
        _run(_fit(args.eval_config, run_dir, "eval", args.seed, extra, resume, "validate"), "eval")
        state["eval"] = _last_metrics(run_dir / "eval" / "version_0" / "metrics.csv")
        print(f"[soar-sip] eval: {json.dumps(state['eval'])}", flush=True)
        finish("eval", t0)
    print(f"[soar-sip] done: {run_dir} ({json.dumps(state['seconds'])} s)", flush=True)
    return state


def _overrides(given: list[str] | None, default: list[str]) -> list[str]:
    return default if given is None else given


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m lit_selfimprove soar-sip",
        description=__doc__.split("\n\n")[0],
        epilog="Overrides go to one stage, one per flag, with '=': --soar=--trainer.max_steps=4 "
        "--sip=--model.init_args.candidates.num_rollouts=4",
    )
    p.add_argument("--run-dir", required=True, help="where every stage's outputs go")
    p.add_argument("--soar-config", type=Path, default=Path("configs/tiny/soar.yaml"))
    p.add_argument("--sip-config", type=Path, default=Path("configs/tiny/soar_sip.yaml"))
    p.add_argument(
        "--eval-config", type=Path, default=Path("configs/tiny/soar_pq.yaml"),
        help="a StudentRLVR config whose validation measures the SIP policy (greedy, pass@k on its test set)",
    )  # fmt: skip
    p.add_argument(
        "--no-eval", dest="eval_config", action="store_const", const=None, help="skip the eval stage"
    )
    p.add_argument("--seed", type=int, default=0, help="seed_everything of every stage")
    p.add_argument("--solutions", choices=["student", "teacher"], default="student")
    p.add_argument("--keep", choices=["all", "agree"], default="agree")
    p.add_argument("--max-new-tokens", type=int, default=80, help="student solution budget (tokens)")
    p.add_argument(
        "--student-prompt", default="Q: {question}\nA: ", help="the student's prompt for its solutions"
    )
    p.add_argument(
        "--extra-questions", action="append", type=Path, metavar="JSONL",
        help="more (question, answer) rows for the corpus, e.g. sample-questions output (repeatable)",
    )  # fmt: skip
    for stage, default in SOAR_SIP_DEFAULTS.items():
        p.add_argument(
            f"--{stage}", action="append", metavar="OVERRIDE",
            help=f"an override of the {stage} stage (repeatable; default: {' '.join(default) or 'none'})",
        )  # fmt: skip
    p.add_argument("--ckpt_path", "--ckpt-path", choices=["last"], help="resume the loop in --run-dir")
    args = p.parse_args(argv)
    for stage, default in SOAR_SIP_DEFAULTS.items():
        setattr(args, stage, _overrides(getattr(args, stage), default))
    if args.keep == "agree" and args.solutions != "student":
        p.error("--keep agree filters student solutions; use --solutions student")
    for config in (args.soar_config, args.sip_config, args.eval_config):
        if config is not None and not config.is_file():
            p.error(f"no config file {config}")
    run_loop(args)


if __name__ == "__main__":
    main()
