"""The embedded tiny world: synthetic addition problems whose skills compose.

Level ``L`` is the sum of two ``L``-digit numbers. The student answers with a short
scratchpad that adds digit by digit from the least significant end and then boxes the
result, e.g. ``345+678`` -> ``5+8=13,4+7+1=12,3+6+1=10 \\boxed{1023}``. The bundled student
base (``configs/tiny/pretrain_student.yaml``) is pre-trained on levels 1-6, where the
solutions of levels 3-6 come from "imperfect data" that forgets each carry with
probability 0.7. So:

* levels 1-2 are solved;
* level 3 (medium) is only partly solved (~34% greedy): the right habit is in the model's
  distribution but is not its mode, which is exactly what RL with verifiable rewards fixes;
* long sums with many carries (levels 5-6) are never solved: a problem with c carries is
  right with probability ~0.3^c. The fail@128 hard set keeps the 5-6 digit problems the base
  solved 0 times in 128 samples. RLVR on them gets no reward at all, but the skill they need
  (carrying) can be learned on easier problems that the student sometimes gets right: the
  stepping stones SOAR's teacher has to find.
* a 0/128 problem is not a 0-probability one: the fail@128 set is solved in ~0.35% of samples
  (3-4 carries ~0.45%, 5 ~0.23%), a trickle that RLVR alone amplifies. The **strict** hard set
  (``builtin:tiny-strict-train`` / ``-test``) keeps 5-6 digit sums with at least 5 carries that
  are also 0/128, where the base's success probability is ~0.2% or less.

The teacher (``configs/tiny/pretrain_teacher.yaml``) writes problems of levels 1-6 as
``<question>345+678</question>5+8=13,4+7+1=12,3+6+1=10 <answer>\\boxed{1023}</answer>``: it works
the answer out between the tags (SOAR's teacher reasons outside the tags) with a scratchpad that
forgets carries 30% of the time on levels 3-6, so its answers to long problems are often wrong,
as in the paper (about 60% of its answers are right).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lit_selfimprove.rewards.math_verify import extract_boxed

LEVELS = range(1, 7)  # the tiny bases are pre-trained on levels 1-6 (configs/tiny/pretrain_*.yaml)


def make_problem(level: int, rng: random.Random) -> dict:
    """One addition problem of two ``level``-digit numbers."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    low = 0 if level == 1 else 10 ** (level - 1)
    a, b = rng.randint(low, 10**level - 1), rng.randint(low, 10**level - 1)
    return {"question": f"{a}+{b}", "answer": str(a + b), "level": level}


def carries(question: str) -> int:
    """How many carries the column addition ``a+b`` makes (``999+1`` -> 3)."""
    left, right = question.split("+")
    width = max(len(left), len(right))
    count = carry = 0
    for x, y in zip(left.zfill(width)[::-1], right.zfill(width)[::-1]):
        carry = (int(x) + int(y) + carry) // 10
        count += carry
    return count


def student_solution(question: str, carry_drop: float = 0.0, rng: random.Random | None = None) -> str:
    """The scratchpad solution for ``a+b`` ending in ``\\boxed{...}``.

    With ``carry_drop`` > 0 each carry is forgotten with that probability (a sloppy solution,
    as found in imperfect pre-training data): the steps and the boxed result then agree with
    each other but the result is wrong.
    """
    left, right = question.split("+")
    width = max(len(left), len(right))
    da, db = left.zfill(width)[::-1], right.zfill(width)[::-1]
    steps, carry, digits = [], 0, []
    for x, y in zip(da, db):
        if carry and carry_drop and rng is not None and rng.random() < carry_drop:
            carry = 0
        s = int(x) + int(y) + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        digits.append(str(s % 10))
        carry = s // 10
    result = (str(carry) if carry else "") + "".join(reversed(digits))
    return ",".join(steps) + f" \\boxed{{{int(result)}}}"


def teacher_text(question: str, answer: str, work: str = "") -> str:
    """A teacher completion; ``work`` (a scratchpad) goes between the question and the answer,
    outside the tags, as SOAR's prompt asks of the teacher's reasoning."""
    return f"<question>{question}</question>{work}<answer>\\boxed{{{answer}}}</answer>"


def teacher_example(question: str, carry_drop: float = 0.0, rng: random.Random | None = None) -> str:
    """A teacher completion that works the answer out with the (possibly sloppy) scratchpad."""
    solution = student_solution(question, carry_drop, rng)
    work, boxed = solution.rsplit(" \\boxed{", 1)
    return teacher_text(question, boxed[:-1], work + " ")


def sample_levels(weights: Sequence[float], n: int, rng: random.Random) -> list[int]:
    levels = list(range(1, len(weights) + 1))
    return rng.choices(levels, weights=weights, k=n)


# the student's pre-training mixture (configs/tiny/pretrain_student.yaml): levels 1-6, sloppy on 3-6
PRETRAIN_LEVEL_WEIGHTS = (0.1, 0.15, 0.25, 0.25, 0.15, 0.1)
PRETRAIN_SLOPPY_LEVELS = (3, 4, 5, 6)
PRETRAIN_CARRY_DROP = 0.7


def plain_documents(
    n: int,
    seed: int,
    level_weights: Sequence[float] = PRETRAIN_LEVEL_WEIGHTS,
    sloppy_levels: Sequence[int] = PRETRAIN_SLOPPY_LEVELS,
    carry_drop: float = PRETRAIN_CARRY_DROP,
    template: str = "Q: {question}\nA: {solution}",
) -> list[dict]:
    """``n`` documents of the world as the student was pre-trained on them: a problem of the
    pre-training level mixture and its scratchpad solution, sloppy (carries dropped with
    ``carry_drop``) on ``sloppy_levels``. ``meta`` holds the question, the true ``answer``, the
    level and whether the document's own boxed result is right (``right``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    docs = []
    for i, level in enumerate(sample_levels(level_weights, n, rng)):
        p = make_problem(level, rng)
        solution = student_solution(p["question"], carry_drop if level in sloppy_levels else 0.0, rng)
        right = extract_boxed(solution) == p["answer"]
        meta = {"question": p["question"], "answer": p["answer"], "level": level, "right": right}
        docs.append(
            {
                "id": f"plain-{seed}-{i}",
                "text": template.format(question=p["question"], solution=solution),
                "meta": meta,
            }
        )
    return docs


def generate_problems(
    levels: int | Sequence[int],
    n: int,
    seed: int,
    exclude: set[str] | None = None,
    min_carries: int = 0,
) -> list[dict]:
    """``n`` distinct problems drawn uniformly from ``levels``, deterministic in ``seed``.

    ``exclude`` holds questions that must not appear (to keep splits disjoint); ``min_carries``
    keeps only sums with at least that many carries (rejection sampling). Ids are
    ``arith-L<level>-<question>`` so that they are stable across runs.
    """
    if min_carries > max([levels] if isinstance(levels, int) else levels):
        raise ValueError(
            f"an L-digit sum makes at most L carries: min_carries={min_carries}, levels={levels}"
        )
    levels = [levels] if isinstance(levels, int) else list(levels)
    capacity = sum((10**lv - (0 if lv == 1 else 10 ** (lv - 1))) ** 2 for lv in levels)
    if n > capacity - len(exclude or ()):
        raise ValueError(f"cannot draw {n} distinct problems from levels {levels} (only {capacity} exist)")
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    for _ in range(1000 * n + 10_000):
        if len(out) == n:
            break
        p = make_problem(rng.choice(levels), rng)
        if p["question"] in seen or carries(p["question"]) < min_carries:
            continue
        seen.add(p["question"])
        out.append({"id": f"arith-L{p['level']}-{p['question']}", **p})
    else:
        if len(out) < n:
            raise ValueError(
                f"found only {len(out)} of {n} distinct problems of levels {levels} with >= {min_carries} carries"
            )
    return out


def quick_correct(completion: str, answer: str) -> bool:
    """Exact string match of the last ``\\boxed{}`` (no math-verify: enough for integers)."""
    found = extract_boxed(completion)
    return found is not None and found == answer.strip()
