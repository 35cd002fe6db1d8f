"""All argument parsing and exit codes live in mtorl/cli.py: library modules take typed arguments and
return results or raise (a module's ``__main__`` block may only hand over to a function of mtorl.cli)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "mtorl"
ENTRY_NAMES = ("main",)
ENTRY_SUFFIXES = ("_main", "_command")


def _modules() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG.parent))
        if rel != "mtorl/cli.py":
            out.append((rel, ast.parse(path.read_text(), rel)))
    return out


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _delegates_to_cli(block: ast.If) -> bool:
    """``from mtorl.cli import X`` then ``raise SystemExit(X())`` / ``sys.exit(X())``, nothing else."""
    imported = {a.asname or a.name for n in block.body if isinstance(n, ast.ImportFrom) and n.module == "mtorl.cli"
                for a in n.names}
    for n in block.body:
        if isinstance(n, ast.ImportFrom) and n.module == "mtorl.cli":
            continue
        call = n.exc if isinstance(n, ast.Raise) else n.value if isinstance(n, ast.Expr) else None
        if not (isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Call)
                and isinstance(call.args[0].func, ast.Name) and call.args[0].func.id in imported):
            return False
    return bool(imported)


def test_only_cli_parses_arguments_or_returns_exit_codes() -> None:
    problems = []
    for rel, tree in _modules():
        guards = [n for n in tree.body if _is_main_guard(n)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                problems.append(f"{rel}:{node.lineno}: imports argparse")
            if isinstance(node, ast.ImportFrom) and node.module == "argparse":
                problems.append(f"{rel}:{node.lineno}: imports argparse")
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and (node.name in ENTRY_NAMES or node.name.endswith(ENTRY_SUFFIXES))
                    and isinstance(node.returns, ast.Name) and node.returns.id == "int"):
                problems.append(f"{rel}:{node.lineno}: {node.name}() -> int: a command returning an exit code")
            exits = isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "exit"
                 and isinstance(node.func.value, ast.Name) and node.func.value.id == "sys")
                or (isinstance(node.func, ast.Name) and node.func.id == "SystemExit"))
            if exits and not any(g.lineno <= node.lineno <= (g.end_lineno or 0) for g in guards):
                problems.append(f"{rel}:{node.lineno}: exits the process outside a __main__ block")
        for g in guards:
            if not _delegates_to_cli(g):  # type: ignore[arg-type]
                problems.append(f"{rel}:{g.lineno}: the __main__ block must only hand over to mtorl.cli")
    assert not problems, "\n".join(problems)
