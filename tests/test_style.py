"""One screen per idea (STYLE.md 11, issue 18): no function of the project's code is longer than 80 lines.

ruff holds the rest of the rule (C901 and PLR0915 in pyproject.toml); the length has no ruff rule, so it is
measured here, from the first decorator (or the `def`) to the function's last line.
"""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("distilflow", "tasks", "flows", "cli", "stack", "bench")
MAX_LINES = 80


def long_functions(path: Path, limit: int = MAX_LINES) -> list[tuple[int, str, int]]:
    """(line, name, length) of every function in `path` longer than `limit` lines, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            length = node.end_lineno - start + 1
            if length > limit:
                found.append((start, node.name, length))
    return found


def test_no_function_is_longer_than_a_screen():
    offenders = [
        f"{path.relative_to(REPO)}:{line}:{name} is {length} lines"
        for pkg in PACKAGES
        for path in sorted((REPO / pkg).rglob("*.py"))
        if "results" not in path.relative_to(REPO).parts
        for line, name, length in long_functions(path)
    ]
    assert not offenders, f"functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(offenders)


def test_the_length_counts_decorators_and_nested_functions(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(78))
    nested = "\n".join(f"            x{i} = {i}" for i in range(79))
    source = tmp_path / "m.py"
    source.write_text(
        # decorator + def + 78 lines = 80: at the limit, allowed
        f"@decorator\ndef fits():\n{body}\n\n\n"
        # 81 with its two decorators
        f"@decorator\n@another\ndef too_long():\n{body}\n\n\n"
        # a method (83 lines) and the function nested in it (def + 79 + return = 81)
        f"class C:\n    def outer(self):\n        def inner():\n{nested}\n            return 1\n        return inner\n"
    )
    assert {name: length for _, name, length in long_functions(source)} == {"too_long": 81, "outer": 83, "inner": 81}
