"""SOAR's output as a pretraining corpus: (question, answer) rows rendered into documents.

A SOAR run writes its curriculum in three forms, all JSONL rows with ``question`` and ``answer``:

* ``promotion_questions.jsonl`` (PQ): the datasets of the promotions (SOAR's D_best);
* ``teacher_samples.jsonl``: the datasets of the logged outer steps, with their rewards (every step
  with ``log_samples_every: 1``);
* the output of ``sample-questions`` (pairs sampled from a trained teacher).

:func:`load_soar_rows` reads any of them (or a run directory: its PQ file, ``part="samples"``, or both
with ``part="all"``, each question once) and
refuses bad or empty input with a message naming the file, the line and what to do.
:func:`render_documents` turns rows into documents ``template.format(question=..., solution=...)``,
where the solution is

* ``teacher``: the teacher's answer, boxed (``teacher_solution``, default ``\\boxed{answer}``), or
* ``student``: a student model's own greedy solution to the question (e.g. the promoted student);
  each document records whether its final answer agrees with the teacher's (math-verify), and
  :func:`build_corpus`'s ``keep="agree"`` keeps only those that do.

``python -m lit_selfimprove soar-corpus RUN_DIR --out corpus.jsonl`` writes the documents as a JSONL
corpus (``text`` + ``meta``), which ``PrefixSuffixDataModule`` streams like any corpus (same splits,
filters and exact resume). ``PrefixSuffixDataModule(sources="soar:PATH")`` renders teacher-answer
documents on the fly into a cached JSONL (keyed by the file's content) for the same effect without a
model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from lit_selfimprove.datamodules.readers import Malformed, parse_json

__all__ = [
    "PARTS",
    "SOAR_PREFIX",
    "load_soar_rows",
    "main",
    "materialize",
    "render_documents",
    "write_corpus",
]

SOAR_PREFIX = "soar:"
PARTS = {"pq": "promotion_questions.jsonl", "samples": "teacher_samples.jsonl"}
DEFAULT_TEMPLATE = "Q: {question}\nA: {solution}"  # the tiny student's prompt, then its answer
TEACHER_SOLUTION = "\\boxed{{{answer}}}"


def _source_files(path: Path, part: str) -> list[Path]:
    """The rows files of ``path``: itself, or a run directory's PQ (``part="pq"``, also ``auto``), teacher
    samples (``samples``) or both, PQ first (``all``; the ones that exist)."""
    if part not in ("auto", "all", *PARTS):
        raise ValueError(f"part must be one of auto, all, {', '.join(PARTS)}; got {part!r}")
    if path.is_dir():
        names = list(PARTS.values()) if part == "all" else [PARTS["pq" if part == "auto" else part]]
        found = [path / name for name in names if (path / name).is_file()]
        if not found:
            others = sorted(p.name for p in path.glob("*.jsonl"))
            raise FileNotFoundError(
                f"{path} is not a SOAR run directory with {' or '.join(names)} (it has: "
                f"{others or 'no .jsonl files'}); pass the run directory of a TeacherMetaRL fit, or a rows file"
            )
        return found
    if not path.is_file():
        raise FileNotFoundError(f"no SOAR output at {path}: expected a run directory or a .jsonl rows file")
    return [path]


def _read_rows(src: Path) -> list[dict]:
    """The valid rows of one file (``ValueError`` naming file:line for a bad one)."""
    rows = []
    with open(src, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    row = parse_json(raw.decode("utf-8"))
                except UnicodeDecodeError as error:
                    raise Malformed(f"not UTF-8 ({error.reason} at byte {error.start})") from None
                if not isinstance(row, dict):
                    raise Malformed(f"a JSON {type(row).__name__}, not an object")
                for key in ("question", "answer"):
                    if not isinstance(row.get(key), str) or not row[key].strip():
                        raise Malformed(f"no non-empty string {key!r} (fields: {sorted(row)})")
            except Malformed as error:
                raise ValueError(f"{src}:{number}: not a SOAR row: {error}") from None
            rows.append(row)
    return rows


def load_soar_rows(path: str | os.PathLike, part: str = "auto", dedupe: bool = True) -> list[dict]:
    """The (question, answer) rows of a SOAR output (see the module docstring), in file order.

    Every row needs non-empty string ``question`` and ``answer``; other fields are kept. ``dedupe``
    keeps the first row of each question.

    Raises:
        FileNotFoundError: no such file, or a directory without the part's file.
        ValueError: a line that is not a JSON object with ``question`` / ``answer`` (file:line named), or
            no rows at all (a PQ file is empty when the run never promoted: use ``part="samples"``).
    """
    sources = _source_files(Path(path).expanduser(), part)
    rows, seen = [], set()
    for src in sources:
        for row in _read_rows(src):
            if dedupe and row["question"] in seen:
                continue
            seen.add(row["question"])
            rows.append(row)
    if not rows:
        hint = (
            " (a SOAR run writes promotion questions only when it promotes; use its teacher samples, "
            "part='samples' / --part samples, or a run that promoted)"
            if [s.name for s in sources] == [PARTS["pq"]]
            else ""
        )
        raise ValueError(f"{' and '.join(map(str, sources))} hold(s) no (question, answer) rows{hint}")
    return rows


def _student_solutions(
    rows, student: str, prompt_template: str, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy solutions of ``student`` (a model path / builtin name) to the rows' questions."""
    import torch
    from tqdm import tqdm

    from lit_selfimprove.generation import generate
    from lit_selfimprove.modeling import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(student, dtype=torch.float32), load_tokenizer(student)
    model.eval()
    out: list[str] = []
    for i in tqdm(range(0, len(rows), batch_size), desc="student solutions", unit="batch"):
        prompts = [prompt_template.format(question=r["question"]) for r in rows[i : i + batch_size]]
        out += generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0).texts
    return out


def render_documents(
    rows: Sequence[dict],
    solutions: str = "teacher",
    template: str = DEFAULT_TEMPLATE,
    teacher_solution: str = TEACHER_SOLUTION,
    student: str | None = None,
    student_prompt: str = "Q: {question}\nA: ",
    max_new_tokens: int = 96,
    batch_size: int = 32,
) -> list[dict]:
    """Documents ``{"id", "text", "meta"}`` from SOAR rows (see the module docstring).

    ``meta`` holds the row's ``question``, ``answer``, its SOAR fields (step, promotion, dataset,
    reward) and ``solution`` (``teacher`` / ``student``); student documents also ``agrees`` (their final
    answer is math-verify-equivalent to the teacher's); :func:`build_corpus` filters on it."""
    if solutions not in ("teacher", "student"):
        raise ValueError(f"solutions must be 'teacher' or 'student', got {solutions!r}")
    for name, value, fields in (
        ("template", template, ("question", "solution")),
        ("teacher_solution", teacher_solution, ("answer",)),
    ):
        try:
            value.format(**{f: "" for f in fields})
        except (KeyError, IndexError) as error:
            raise ValueError(f"{name} {value!r} may only use the fields {fields}: {error!r}") from None
    if solutions == "teacher":
        texts = [teacher_solution.format(answer=r["answer"]) for r in rows]
        agrees = [None] * len(rows)
    else:
        if not student:
            raise ValueError(
                "solutions='student' needs a student model (e.g. <run dir>/students/promotion_0_step_3)"
            )
        from lit_selfimprove.rewards.math_verify import MathVerifyReward

        texts = _student_solutions(rows, student, student_prompt, max_new_tokens, batch_size)
        verify = MathVerifyReward(mode="binary", num_workers=1)
        try:
            agrees = verify.correct(texts, [r["answer"] for r in rows]).tolist()
        finally:
            verify.close()
    docs = []
    for i, (row, solution, agree) in enumerate(zip(rows, texts, agrees)):
        meta = {k: v for k, v in row.items() if k not in ("id",)}
        meta["solution"] = solutions
        if agree is not None:
            meta["agrees"] = bool(agree)
        doc_id = str(row.get("id", f"soar-{i}"))
        docs.append(
            {"id": doc_id, "text": template.format(question=row["question"], solution=solution), "meta": meta}
        )
    return docs


def build_corpus(rows: Sequence[dict], keep: str = "all", **render) -> tuple[list[dict], dict]:
    """:func:`render_documents` of ``rows`` (``render``: its arguments) with ``keep`` applied after, and a
    summary: rows, documents kept, and the share of student solutions that agree with the teacher's
    answer over all rendered ones (``None`` for teacher solutions)."""
    if keep not in ("all", "agree"):
        raise ValueError(f"keep must be 'all' or 'agree', got {keep!r}")
    if keep == "agree" and render.get("solutions", "teacher") != "student":
        raise ValueError("keep='agree' filters student solutions; it needs solutions='student'")
    docs = render_documents(rows, **render)
    agree = [d["meta"]["agrees"] for d in docs if "agrees" in d["meta"]]
    kept = [d for d in docs if keep == "all" or d["meta"]["agrees"]]
    if not kept:
        raise ValueError(
            f"no documents left: none of the {len(rows)} student solutions agreed with the teacher"
        )
    summary = {
        "rows": len(rows),
        "documents": len(kept),
        "student_agrees": sum(agree) / len(agree) if agree else None,
    }
    return kept, summary


def write_corpus(docs: Sequence[dict], out: str | os.PathLike) -> Path:
    """Write documents as a JSONL corpus, atomically (a temporary file renamed when complete)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    os.replace(tmp, out)
    return out


def materialize(spec: str, cache_dir: str | os.PathLike | None = None) -> str:
    """``soar:PATH`` -> a cached JSONL corpus of its teacher-answer documents (default template).

    The cache file is named by a digest of the rows file's content, so a changed file is rendered again
    and an unchanged one is read from the cache (``~/.cache/lit-selfimprove/soar-corpus`` by default)."""
    from lit_selfimprove.assets import resolve

    # soar:builtin:tiny-soar -> the bundled run
    path = resolve(spec[len(SOAR_PREFIX) :] if spec.startswith(SOAR_PREFIX) else spec)
    src = _source_files(Path(path).expanduser(), "auto")[0]
    digest = hashlib.sha1(src.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir or Path.home() / ".cache" / "lit-selfimprove" / "soar-corpus")
    out = root / f"{src.stem}-{digest}.jsonl"
    if not out.is_file():
        write_corpus(render_documents(load_soar_rows(src)), out)
    return str(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lit_selfimprove soar-corpus",
        description="Render a SOAR run's output (PQ, teacher samples or sampled questions) as a JSONL corpus "
        "for PrefixSuffixDataModule.",
    )
    parser.add_argument(
        "source", help="a SOAR run directory or a rows .jsonl (PQ, teacher samples, sample-questions)"
    )
    parser.add_argument("--out", required=True, help="the corpus .jsonl to write")
    parser.add_argument(
        "--part",
        default="auto",
        choices=["auto", "all", *PARTS],
        help="which file of a run directory (all: PQ, then samples)",
    )
    parser.add_argument("--solutions", default="teacher", choices=["teacher", "student"])
    parser.add_argument(
        "--student", help="the model that writes student solutions (a folder or builtin:NAME)"
    )
    parser.add_argument(
        "--keep",
        default="all",
        choices=["all", "agree"],
        help="agree: only student solutions whose answer agrees with the teacher's",
    )
    parser.add_argument("--template", default=DEFAULT_TEMPLATE)
    parser.add_argument("--student-prompt", default="Q: {question}\nA: ")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--no-dedupe", action="store_true", help="keep repeated questions")
    args = parser.parse_args(argv)
    try:
        rows = load_soar_rows(args.source, args.part, dedupe=not args.no_dedupe)
        docs, summary = build_corpus(
            rows,
            args.keep,
            solutions=args.solutions,
            template=args.template,
            student=args.student,
            student_prompt=args.student_prompt,
            max_new_tokens=args.max_new_tokens,
        )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"soar-corpus: {error}") from None
    out = write_corpus(docs, args.out)
    print(json.dumps({**summary, "out": str(out)}))


if __name__ == "__main__":
    main()
