"""Every command-line tool is listed in ``cli.TOOLS`` and answers through ``python -m lit_selfimprove NAME``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lit_selfimprove import cli

PKG = Path(cli.__file__).parent
# the CLI itself, and math-verify's worker process (started by MathVerifyReward, not by users)
INTERNAL = {"lit_selfimprove.cli", "lit_selfimprove.rewards._verify_worker"}


def _modules_with_a_main() -> set[str]:
    found = set()
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            found.add(".".join(path.relative_to(PKG.parent).with_suffix("").parts))
    return found - INTERNAL


def test_every_module_with_a_main_is_a_listed_tool():
    assert _modules_with_a_main() == set(cli.TOOLS.values())


@pytest.mark.parametrize("name", sorted(cli.TOOLS))
def test_each_tool_answers_help_under_its_name(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
