"""Prompts and chat-template helpers every layer may use (no imports of the package's own layers).

* :data:`SOAR_STUDENT_PROMPT` / :data:`SOAR_TEACHER_PROMPT`: SOAR's student and teacher prompts
  (a student prompt formats ``{question}``);
* :data:`TINY_STUDENT_PROMPT` / :data:`TINY_TEACHER_PROMPT`: the embedded tiny world's prompts;
* :func:`as_user_turn`: a text as is, or as the user turn of a tokenizer's chat template.
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
