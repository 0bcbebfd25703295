"""Mutation testing for the crash-safety code: does some fast test fail when one guard is broken?

    python -m ops.mutate                                   # worker/lua.py worker/store.py
    python -m ops.mutate worker/session_machine.py --max 40
    python -m ops.mutate --pytest-args "tests/test_fencing.py -k release" --list

Applies one mutation at a time to a target file and runs the fast tests; a mutant the tests do
not notice ("survived") is a guarantee no test checks. Everything happens in a throw-away copy of
the work tree (tracked and untracked, non-ignored files), so the real files are never touched and
an interrupted run leaves nothing behind; the copy's file is restored after every mutant anyway.

Mutations:
- Lua (lines inside the script strings of a Python file, e.g. worker/lua.py): delete a fence
  guard (`if ... epoch ... then return 'fenced' end`), delete one `redis.call(...)` statement,
  flip `~=` <-> `==`, `>=` -> `>`.
- Python (function bodies): replace one simple statement with `pass`, negate a comparison
  (`==` <-> `!=`, `<` <-> `>=`, `>` <-> `<=`, `in` <-> `not in`, `is` <-> `is not`), swap
  `>` <-> `>=` and `<` <-> `<=`.

Exit status: 0 when every mutant was killed, 1 when some survived, 2 when the unmutated tests
fail (nothing is measured then).
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TARGETS = ["worker/lua.py", "worker/store.py"]
DEFAULT_PYTEST_ARGS = "tests/test_fencing.py tests/test_store.py"

FENCE_GUARD = re.compile(r"^\s*if\b.*\bepoch\b.*\bthen\s+return\s+'fenced'\s+end\s*$")
LUA_OPS = {"~=": ["=="], "==": ["~="], ">=": [">"]}
PY_SWAPS = {
    "==": ["!="],
    "!=": ["=="],
    "<": ["<=", ">="],
    "<=": ["<", ">"],
    ">": [">=", "<="],
    ">=": [">", "<"],
}
COMPOUND = (
    ast.If,
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.With,
    ast.AsyncWith,
    ast.Try,
    ast.Match,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
)
LUA_BLOCK_START = re.compile(r"^\s*(if|for|while|elseif|else|function|local\s+function|repeat)\b")


@dataclass(frozen=True, slots=True)
class Mutant:
    path: str  # relative to the tree
    line: int  # 1-based, first line changed
    kind: str
    before: str
    after: str
    text: str  # the whole mutated file


@dataclass(slots=True)
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | timeout | error
    seconds: float


# ------------------------------------------------------------------------------------ mutants


def lua_line_numbers(source: str) -> set[int]:
    """Lines strictly inside multi-line string constants: the Lua scripts of worker/lua.py."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        end = node.end_lineno or node.lineno
        lines.update(range(node.lineno + 1, end))
    return lines


def _quoted_spans(line: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"'[^']*'|\"[^\"]*\"", line)]


def _outside_quotes(line: str, pos: int) -> bool:
    return not any(a <= pos < b for a, b in _quoted_spans(line))


def _lua_statement_end(lines: list[str], start: int) -> int:
    """Index of the last line of the statement starting at `start` (balanced parentheses)."""
    depth, i = 0, start
    while i < len(lines):
        code = re.sub(r"'[^']*'|\"[^\"]*\"|--.*$", "", lines[i])
        depth += code.count("(") + code.count("{") - code.count(")") - code.count("}")
        if depth <= 0:
            return i
        i += 1
    return start


def lua_mutants(rel: str, source: str) -> list[Mutant]:
    lines = source.splitlines(keepends=True)
    out: list[Mutant] = []
    for number in sorted(lua_line_numbers(source)):
        i = number - 1
        line = lines[i]
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        opens_block = LUA_BLOCK_START.match(line) is not None and not re.search(r"\bend\s*$", stripped)
        if FENCE_GUARD.match(line):
            text = "".join(lines[:i] + lines[i + 1 :])
            out.append(Mutant(rel, number, "lua: delete fence guard", stripped, "", text))
        elif "redis.call(" in line and not opens_block:
            end = _lua_statement_end(lines, i)
            text = "".join(lines[:i] + lines[end + 1 :])
            out.append(Mutant(rel, number, "lua: delete redis.call", stripped, "", text))
        for op, replacements in LUA_OPS.items():
            for match in re.finditer(re.escape(op), line):
                if not _outside_quotes(line, match.start()):
                    continue
                if op == "==" and line[max(0, match.start() - 1)] in "~<>=":
                    continue
                for new in replacements:
                    mutated = line[: match.start()] + new + line[match.end() :]
                    text = "".join([*lines[:i], mutated, *lines[i + 1 :]])
                    out.append(Mutant(rel, number, f"lua: {op} -> {new}", stripped, mutated.strip(), text))
    return out


def _function_statements(tree: ast.AST) -> list[ast.stmt]:
    """Simple statements (no compound ones, no docstrings) anywhere inside function bodies."""
    found: list[ast.stmt] = []

    def visit_body(body: list[ast.stmt]) -> None:
        for index, stmt in enumerate(body):
            is_docstring = index == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            compound = isinstance(stmt, COMPOUND)
            if not compound and not is_docstring:
                found.append(stmt)
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(stmt, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    visit_body(inner)
            for handler in getattr(stmt, "handlers", []):
                visit_body(handler.body)
            for case in getattr(stmt, "cases", []):
                visit_body(case.body)

    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            visit_body(node.body)
    return found


def python_mutants(rel: str, source: str) -> list[Mutant]:
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    out: list[Mutant] = []
    seen: set[int] = set()
    for stmt in _function_statements(tree):
        start, end = stmt.lineno - 1, (stmt.end_lineno or stmt.lineno) - 1
        first = lines[start]
        indent = first[: len(first) - len(first.lstrip())]
        # Only statements that own their lines (not `if x: return y`, not `a; b`).
        if stmt.col_offset != len(indent) or start in seen:
            continue
        rest = lines[end][stmt.end_col_offset or 0 :].strip()
        if rest and not rest.startswith("#"):
            continue
        seen.add(start)
        text = "".join([*lines[:start], f"{indent}pass\n", *lines[end + 1 :]])
        out.append(Mutant(rel, stmt.lineno, "py: statement -> pass", first.strip(), "pass", text))

    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for k, tok in enumerate(tokens):
        replacements: list[str] = []
        span = (tok.start, tok.end)
        if tok.type == tokenize.OP and tok.string in PY_SWAPS:
            replacements = PY_SWAPS[tok.string]
        elif tok.type == tokenize.NAME and tok.string in ("in", "is"):
            prev = tokens[k - 1] if k else None
            nxt = tokens[k + 1] if k + 1 < len(tokens) else None
            if tok.string == "in" and prev is not None and prev.string == "not":
                span, replacements = (prev.start, tok.end), ["in"]
            elif tok.string == "in" and _is_comparison_in(tokens, k):
                replacements = ["not in"]
            elif tok.string == "is" and nxt is not None and nxt.string == "not":
                span, replacements = (tok.start, nxt.end), ["is"]
            elif tok.string == "is":
                replacements = ["is not"]
        for new in replacements:
            (row, col), (row2, col2) = span
            if row != row2:
                continue
            line = lines[row - 1]
            mutated = line[:col] + new + line[col2:]
            text = "".join([*lines[: row - 1], mutated, *lines[row:]])
            old = line[col:col2]
            out.append(Mutant(rel, row, f"py: {old} -> {new}", line.strip(), mutated.strip(), text))
    return out


def _is_comparison_in(tokens: list[tokenize.TokenInfo], k: int) -> bool:
    """`in` as an operator, not the `in` of a for loop or comprehension."""
    depth = 0
    for j in range(k - 1, -1, -1):
        tok = tokens[j]
        if tok.type == tokenize.OP and tok.string in ")]}":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in "([{":
            if depth == 0:
                return True
            depth -= 1
        elif tok.type == tokenize.NAME and tok.string in ("for", "async") and depth == 0:
            return False
        elif tok.type in (tokenize.NEWLINE, tokenize.NL) and depth == 0:
            return True
    return True


def mutants_for(tree: Path, rel: str) -> list[Mutant]:
    source = (tree / rel).read_text()
    found = lua_mutants(rel, source) if lua_line_numbers(source) else []
    found += python_mutants(rel, source)
    unique: dict[str, Mutant] = {}
    for mutant in found:
        if mutant.text != source:
            try:
                compile(mutant.text, rel, "exec")
            except SyntaxError:
                continue
            unique.setdefault(mutant.text, mutant)
    return list(unique.values())


# ------------------------------------------------------------------------------------ running


def copy_tree(repo: Path, dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        src = repo / rel
        if not src.is_file():  # deleted in the work tree but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def run_pytest(tree: Path, args: list[str], timeout: float) -> tuple[str, float, str]:
    """(status, seconds, output tail). The tests run in the copy: cwd first on sys.path wins over
    the editable install; no bytecode, so a same-size mutation is never served a stale .pyc."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = "survived" if proc.returncode == 0 else "killed"
        if proc.returncode in (2, 3, 4):  # interrupted, internal error, usage error
            status = "error"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the test run and the redis-servers it started
        output, _ = proc.communicate()
        status = "timeout"
    tail = output.decode(errors="replace").strip().splitlines()[-1:] or [""]
    return status, time.monotonic() - started, tail[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"files to mutate (default: {' '.join(DEFAULT_TARGETS)})")
    parser.add_argument("--pytest-args", default=DEFAULT_PYTEST_ARGS, help="tests run against each mutant")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per mutant's test run")
    parser.add_argument("--max", type=int, default=0, help="run at most this many mutants (0: all)")
    parser.add_argument("--only", default="", help="regex: only mutants whose kind or line matches")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    opts = parser.parse_args(argv)

    repo: Path = opts.repo.resolve()
    targets = opts.targets or DEFAULT_TARGETS
    pytest_args = shlex.split(opts.pytest_args)
    mutants = [m for rel in targets for m in mutants_for(repo, rel)]
    if opts.only:
        only = re.compile(opts.only)
        mutants = [m for m in mutants if only.search(m.kind) or only.search(m.before)]
    if opts.max:
        mutants = mutants[: opts.max]
    if opts.list:
        for n, m in enumerate(mutants, 1):
            print(f"{n:4} {m.path}:{m.line:<4} {m.kind:28} {m.before[:70]}")
        return 0

    with tempfile.TemporaryDirectory(prefix="vq-mutate-") as tmp:
        tree = Path(tmp)
        copy_tree(repo, tree)
        print(f"tree copied to {tree}; tests: pytest -x {' '.join(pytest_args)}", flush=True)
        status, seconds, tail = run_pytest(tree, pytest_args, opts.timeout)
        print(f"baseline (no mutation): {status} in {seconds:.1f}s: {tail}", flush=True)
        if status != "survived":
            print("the unmutated tests do not pass: nothing to measure", file=sys.stderr)
            return 2
        outcomes: list[Outcome] = []
        for n, mutant in enumerate(mutants, 1):
            path = tree / mutant.path
            original = path.read_text()
            try:
                path.write_text(mutant.text)
                status, seconds, tail = run_pytest(tree, pytest_args, opts.timeout)
            finally:
                path.write_text(original)
            outcomes.append(Outcome(mutant, status, seconds))
            print(
                f"[{n}/{len(mutants)}] {status:8} {seconds:5.1f}s {mutant.path}:{mutant.line} "
                f"{mutant.kind}: {mutant.before[:60]}",
                flush=True,
            )
    return report(outcomes)


def report(outcomes: list[Outcome]) -> int:
    killed = [o for o in outcomes if o.status in ("killed", "timeout")]
    survived = [o for o in outcomes if o.status == "survived"]
    errors = [o for o in outcomes if o.status == "error"]
    total = len(outcomes)
    rate = 100.0 * len(killed) / total if total else 100.0
    print(f"\n{len(killed)}/{total} killed ({rate:.0f}%), {len(survived)} survived, {len(errors)} errors")
    if survived or errors:
        print(f"\n{'result':8} {'where':22} {'mutation':26} line")
        for o in survived + errors:
            where = f"{o.mutant.path}:{o.mutant.line}"
            change = o.mutant.before if not o.mutant.after else f"{o.mutant.before}  =>  {o.mutant.after}"
            print(f"{o.status:8} {where:22} {o.mutant.kind:26} {change[:110]}")
    return 0 if not survived and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
