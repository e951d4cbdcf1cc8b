"""Find and run the code blocks of the documentation (tests/test_docs.py), so that its examples cannot rot.

- ```bash blocks run command by command in a work folder: `.venv/bin/miaotui ...` in this process (its imports
  are paid once), `echo TEXT | .venv/bin/miaotui ...` with TEXT as standard input, `miaotui ... || OTHER` with
  OTHER through bash when the first fails; anything else (printf, redirections, runs that start processes) through
  bash. `NAME=value` lines set variables for the lines after them; `./setup.sh` counts as done (the tests run in
  the environment it made). Every command must exit with status 0.
- ```python blocks run with exec, in one namespace per page.
- ```yaml blocks must parse; one with `steps:` must be a valid recipe.
- `<!-- skip: REASON -->` on the line above a block (a blank line may come between) skips it, with its reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

RUN_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python", "yaml": "yaml"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
SKIP = re.compile(r"^\s*<!--\s*skip:(?P<reason>.*?)-->\s*$")
ASSIGN = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>\S*)$")
SETUP = re.compile(r"^\./setup\.sh(\s+--dev)?\s*&&\s*")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "<<", "(", ")", "2>", "&>"}
SUBPROCESS_FLAGS = {"--tp", "--pp", "--replicas", "--autoscale"}  # they start processes or clusters: not in-process


class DocsError(Exception):
    """A malformed documentation page (a skip marker with no block after it, a fence left open)."""


@dataclass
class Block:
    path: str
    line: int  # of the opening fence, 1-based
    lang: str  # bash, python, yaml, or the info string's first word for blocks that are not run
    code: str
    skip: str | None = None  # the reason, for a block marked <!-- skip: ... -->

    @property
    def runs(self) -> bool:
        return self.lang in ("bash", "python", "yaml") and self.skip is None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Result:
    block: Block
    ok: bool
    seconds: float = 0.0
    output: str = ""
    error: str = ""


def extract(text: str, path: str = "<text>") -> list[Block]:
    """The fenced code blocks of a markdown text, in order (blocks nested in a longer fence are its text)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending_skip: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        skip = SKIP.match(lines[i])
        if skip:
            reason = skip["reason"].strip()
            if not reason:
                raise DocsError(f"{path}:{i + 1}: a skip marker needs a reason: <!-- skip: why -->")
            pending_skip = (i, reason)
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            if lines[i].strip() and pending_skip is not None:
                raise DocsError(f"{path}:{pending_skip[0] + 1}: a skip marker must come right before a code block")
            i += 1
            continue
        marker, indent = fence["fence"], len(fence["indent"])
        closing = re.compile(rf"^ *{re.escape(marker[0])}{{{len(marker)},}}\s*$")
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        if j == len(lines):
            raise DocsError(f"{path}:{i + 1}: a code block is never closed")
        body = [line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines[i + 1 : j]]
        info = fence["info"].strip().lstrip("{").lstrip(".")
        word = re.split(r"[\s{}]", info, maxsplit=1)[0].lower() if info else ""
        lang = RUN_LANGS.get(word, word)
        reason = None
        if pending_skip is not None:
            reason = pending_skip[1]
            pending_skip = None
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n", reason))
        i = j + 1
    if pending_skip is not None:
        raise DocsError(f"{path}:{pending_skip[0] + 1}: a skip marker must come right before a code block")
    return blocks


def logical_lines(code: str) -> list[str]:
    """Shell lines with their backslash continuations joined; blank lines and comment lines dropped."""
    out, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    if current.strip():
        out.append(current.strip())
    return out


def _tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _is_miaotui(token: str) -> bool:
    return token in ("miaotui", ".venv/bin/miaotui") or token.endswith("/.venv/bin/miaotui")


class Runner:
    """Runs blocks in `work` (which holds links to .venv and the data, see test_docs.py), keeping variables and,
    per page, one Python namespace."""

    def __init__(self, work: Path, timeout: float = 120):
        self.work, self.timeout = Path(work), timeout
        self.variables: dict[str, str] = {}
        self.namespaces: dict[str, dict] = {}

    def run(self, block: Block) -> Result:
        start = time.perf_counter()
        cwd = os.getcwd()
        os.chdir(self.work)
        try:
            with warnings.catch_warnings():
                output = getattr(self, f"_run_{block.lang}")(block)
            return Result(block, True, time.perf_counter() - start, output)
        except Exception as e:  # a failing example: reported with its page and line
            return Result(block, False, time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
        finally:
            os.chdir(cwd)

    # bash

    def _run_bash(self, block: Block) -> str:
        outputs = []
        for line in logical_lines(block.code):
            line = SETUP.sub("", line)  # ./setup.sh made the environment these tests run in
            if line in ("./setup.sh", "./setup.sh --dev"):
                continue
            assign = ASSIGN.match(line)
            if assign:
                self.variables[assign["name"]] = self._expand(assign["value"])
                continue
            outputs.append(self._command(line))
        return "".join(outputs)

    def _expand(self, text: str) -> str:
        def value(m: re.Match) -> str:
            name = m["name"] or m["braced"]
            return self.variables.get(name, m[0])

        return re.sub(r"\$(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\})", value, text)

    def _command(self, line: str) -> str:
        tokens = _tokens(self._expand(line))
        operators = [t for t in tokens if t in SHELL_OPERATORS]
        if not operators and tokens and _is_miaotui(tokens[0]) and not SUBPROCESS_FLAGS & set(tokens):
            return self._in_process(tokens[1:], line)
        if operators == ["|"] and tokens[0] == "echo":
            bar = tokens.index("|")
            rest = tokens[bar + 1 :]
            if rest and _is_miaotui(rest[0]) and not SUBPROCESS_FLAGS & set(rest):
                return self._in_process(rest[1:], line, stdin=" ".join(tokens[1:bar]) + "\n")
        if "||" in line and line.count("||") == 1:
            left, right = (part.strip() for part in line.split("||"))
            left_tokens = _tokens(self._expand(left))
            if (
                left_tokens
                and _is_miaotui(left_tokens[0])
                and not {*SHELL_OPERATORS, *SUBPROCESS_FLAGS} & set(left_tokens)
            ):
                rc, out, err = self._cli(left_tokens[1:])
                if rc == 0:
                    return out
                return out + err + self._bash(f"(exit {rc}); {right}")
        return self._bash(line)

    def _cli(self, argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
        from miaotui.cli import main

        out, err = io.StringIO(), io.StringIO()
        saved_stdin = sys.stdin
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = main(argv)
                except SystemExit as e:  # argparse's --help and usage errors
                    rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        finally:
            sys.stdin = saved_stdin
        return rc, out.getvalue(), err.getvalue()

    def _in_process(self, argv: list[str], line: str, stdin: str | None = None) -> str:
        rc, out, err = self._cli(argv, stdin)
        if rc != 0:
            raise AssertionError(f"`{line}` exited with status {rc}: {err.strip()[-2000:]}")
        return out

    def _bash(self, line: str) -> str:
        env = {**os.environ, **self.variables}
        env["PATH"] = f"{self.work / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        proc = subprocess.Popen(
            ["bash", "-c", line],
            cwd=self.work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a timeout ends whatever it started
        )
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"`{line}` ran past {self.timeout:.0f} s: mark it <!-- skip: why -->") from None
        if proc.returncode != 0:
            raise AssertionError(f"`{line}` exited with status {proc.returncode}: {(err or out).strip()[-2000:]}")
        return out

    # python and yaml

    def _run_python(self, block: Block) -> str:
        namespace = self.namespaces.setdefault(block.path, {"__name__": "__docs__"})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.code, block.where, "exec"), namespace)
        return out.getvalue()

    def _run_yaml(self, block: Block) -> str:
        import yaml

        from miaotui.recipe import Recipe, read_yaml

        data = read_yaml(block.code)
        if isinstance(data, dict) and "steps" in data:
            Recipe.from_dict(data)
        elif data is None:
            raise yaml.YAMLError("the block is empty")
        return ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    skipped: list[Block] = field(default_factory=list)

    def summary(self) -> str:
        ran = [r for r in self.results if r.block.lang != "yaml"]
        lines = [
            f"{len(ran)} blocks run ({sum(r.seconds for r in ran):.0f} s), "
            f"{len(self.results) - len(ran)} recipes parsed, {len(self.skipped)} skipped:"
        ]
        lines += [f"  skipped {b.where}: {b.skip}" for b in self.skipped]
        lines += [f"  {r.seconds:5.1f} s {r.block.where}" for r in sorted(ran, key=lambda r: -r.seconds)[:10]]
        return "\n".join(lines)


def run_pages(pages: list[Path], root: Path, runner: Runner) -> Report:
    """Run every block of `pages` in order; a page's path in the results is relative to `root`."""
    report = Report()
    for page in pages:
        for block in extract(page.read_text(encoding="utf-8"), str(page.relative_to(root))):
            if block.skip is not None:
                report.skipped.append(block)
            elif block.runs:
                report.results.append(runner.run(block))
    return report
