"""docs/quality.md claims each property by naming the tests that prove it: a renamed or removed test would
leave the claim standing with nothing behind it, so every reference must name a test that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKLIST = ROOT / "docs" / "quality.md"
# `test_vdds.py::test_name`, a continuation `::test_name` (same file as the reference before it), `[param]`
REFERENCE = re.compile(r"(test_\w+\.py)?::(test_\w+)")


def defined_tests(path: Path) -> set[str]:
    """The names of the test functions a test module defines (at any depth: classes count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    }


def test_every_test_the_quality_checklist_names_exists() -> None:
    text = CHECKLIST.read_text(encoding="utf-8")
    missing: list[str] = []
    checked = 0
    for line in text.splitlines():
        module = ""
        for match in REFERENCE.finditer(line):
            module = match.group(1) or module
            assert module, f"a reference without its file: {match.group(0)!r} in {line!r}"
            path = ROOT / "tests" / module
            if not path.exists() or match.group(2) not in defined_tests(path):
                missing.append(f"{module}::{match.group(2)}")
            checked += 1
    assert checked > 50, "the checklist names its tests as file::name"
    assert not missing, missing
