"""Prompts and chat-template helpers every layer may use (no imports of the package's own layers).

* :data:`SOAR_STUDENT_PROMPT` / :data:`SOAR_TEACHER_PROMPT`: SOAR's student and teacher prompts
  (a student prompt formats ``{question}``);
* :data:`TINY_STUDENT_PROMPT` / :data:`TINY_TEACHER_PROMPT`: the embedded tiny world's prompts;
* :func:`as_user_turn`: a text as is, or as the user turn of a tokenizer's chat template;
* :func:`check_student_prompt`: a student prompt template is usable with ``str.format(question=...)``.
"""

from __future__ import annotations

SOAR_STUDENT_PROMPT = (
    "A conversation between User and Assistant. The user asks a math question, and the Assistant "
    "solves it step by step, showing its reasoning, and ends with the final answer in the form "
    '"The final answer is: \\boxed{{answer}}".\nUser: {question}\nAssistant:'
)

SOAR_TEACHER_PROMPT = (
    "You are a creative math teacher. Write ONE new, original and challenging math problem that "
    "takes 2-3 steps to solve, from one of these topics: Algebra, Counting & Probability, Geometry, "
    "Intermediate Algebra, Number Theory, Prealgebra, Precalculus.\n"
    "Think it through first; all your reasoning goes outside the tags. Then write the problem and "
    "its final answer exactly in this format:\n"
    "<question>the problem statement</question><answer>\\boxed{the final answer}</answer>"
)

TINY_STUDENT_PROMPT = "Q: {question}\nA: "
TINY_TEACHER_PROMPT = "Write a new problem.\n"


def as_user_turn(tokenizer, text: str, use_chat_template: bool) -> str:
    """``text`` as is, or as the user turn of the tokenizer's chat template (ready to generate)."""
    if not use_chat_template:
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def check_student_prompt(template: str) -> None:
    """Refuse a student prompt template that ``template.format(question=...)`` cannot fill, at start-up:
    a real model's prompt naturally says ``\\boxed{}``, which ``str.format`` reads as a field, and the run
    would fail only at its first step (``IndexError: Replacement index 0 out of range``), after the model
    loaded."""
    if "{question}" not in template:
        raise ValueError("prompt_template must contain a '{question}' field")
    try:
        template.format(question="")
    except (IndexError, KeyError, ValueError) as err:
        raise ValueError(
            f"prompt_template cannot be filled by str.format(question=...): {type(err).__name__}: {err}. "
            "Only '{question}' is a field; write other braces doubled, e.g. \\boxed{{}} for \\boxed{}"
        ) from None
