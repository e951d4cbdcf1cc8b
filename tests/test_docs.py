"""The documentation: the README's size, commands and links; the code blocks of every page of the site, run in
navigation order (tests/docblocks.py); the runner itself, on small pages with blocks that must fail."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DATA, REPO
from docblocks import Block, DocsError, Runner, extract, logical_lines, run_pages

DOCS = REPO / "docs"
README_LIMIT = 12 * 1024
FEWEST_RUN = 25  # bash and python blocks the pages must run: the skip marker must not become the easy way out
# Pages whose every block may be skipped: benchmark runs, GPU-only commands, long-running servers.
SILENT_PAGES = {
    "index.md",
    "design.md",
    "development.md",
    "guides/serving.md",
    "guides/scale-out.md",
    "guides/autotune.md",
}


def nav_pages() -> list[Path]:
    """The hand-written pages of mkdocs.yml's navigation, in its order (generated pages have no file)."""
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    out: list[Path] = []

    def walk(item):
        if isinstance(item, str):
            out.append(DOCS / item)
        elif isinstance(item, list):
            for x in item:
                walk(x)
        elif isinstance(item, dict):
            for x in item.values():
                walk(x)

    walk(nav)
    return [p for p in out if p.exists()]


def make_work(root: Path) -> Path:
    """A folder like the repository's root for the examples: .venv and benchmarks linked, ../shared/data the data."""
    work = root / "work"
    work.mkdir(parents=True)
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(DATA, target_is_directory=True)
    for name in (".venv", "benchmarks"):
        if (REPO / name).exists():
            (work / name).symlink_to(REPO / name, target_is_directory=True)
    return work


# The README


def test_readme_is_short_and_keeps_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    size = len(text.encode("utf-8"))
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} and move detail into docs/"
    commands = [b.code.strip() for b in extract(text, "README.md") if b.lang == "bash"]
    assert commands[:2] == ["./setup.sh && .venv/bin/miaotui optimize --out demo", "./test.sh"]
    assert ".venv/bin/mkdocs serve" in text
    started = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    for command in commands[:2]:  # run (or marked) on the page the docs test executes
        assert f"```bash\n{command}\n```" in started


def test_readme_links_resolve_into_docs():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert len([link for link in local if link.startswith("docs/")]) >= 20
    for link in local:
        target = (REPO / link.split("#")[0]).resolve()
        assert target.exists(), f"README links to {link}, which does not exist"


def test_every_page_is_in_the_navigation():
    pages = set(nav_pages())
    written = {p for p in DOCS.rglob("*.md") if "scripts" not in p.parts and "compare-ref-llama" not in p.parts}
    assert written == pages, f"pages not in mkdocs.yml's nav: {sorted(map(str, written - pages))}"


# The block extractor and runner, on small pages


PAGE = """# A page

```bash
.venv/bin/miaotui recipes --show w8
```

- a list item with a block inside:

    ```python
    x = 1 + 1
    ```

<!-- skip: needs a GPU -->

```bash
.venv/bin/miaotui bench model --device cuda
```

````markdown
```bash
not extracted: inside a longer fence
```
````

```text
not run
```

```yaml
steps:
- {type: quantize, scheme: w4}
```
"""


def test_extract_finds_blocks_langs_lines_and_skips():
    blocks = extract(PAGE, "page.md")
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (3, "bash", None),
        (9, "python", None),
        (15, "bash", "needs a GPU"),
        (19, "markdown", None),
        (25, "text", None),
        (29, "yaml", None),
    ]
    assert blocks[1].code == "x = 1 + 1\n"  # the list's indentation removed
    assert [b.runs for b in blocks] == [True, True, False, False, False, True]


def test_extract_refuses_malformed_pages():
    with pytest.raises(DocsError, match="needs a reason"):
        extract("<!-- skip: -->\n```bash\nls\n```\n")
    with pytest.raises(DocsError, match="right before a code block"):
        extract("<!-- skip: why -->\nsome text\n```bash\nls\n```\n")
    with pytest.raises(DocsError, match="never closed"):
        extract("```bash\nls\n")


def test_logical_lines_join_continuations_and_drop_comments():
    code = "# a comment\nD=../data\n.venv/bin/miaotui eval m \\\n    --json   # trailing\n\n"
    assert logical_lines(code) == ["D=../data", ".venv/bin/miaotui eval m      --json   # trailing"]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(make_work(tmp_path_factory.mktemp("blocks")))


def _block(lang: str, code: str) -> Block:
    return Block("inline.md", 1, lang, code)


@pytest.mark.parametrize(
    "lang, code, ok",
    [
        ("bash", ".venv/bin/miaotui recipes --show w8\n", True),
        ("bash", ".venv/bin/miaotui recipes --show no-such-recipe\n", False),  # exit status 2
        ("bash", ".venv/bin/miaotui optimize --no-such-flag --out x\n", False),  # argparse's usage error
        ("bash", "printf 'a\\n' > a.txt\ntest -s a.txt\n", True),  # through bash
        ("bash", "false\n", False),
        ("bash", ".venv/bin/miaotui info missing-folder || echo refused with $?\n", True),
        ("bash", "echo 'hi' | .venv/bin/miaotui recipes --show\n", False),  # --show needs its value
        ("python", "import miaotui\nassert 'w8' in miaotui.BUILTIN_RECIPES\n", True),
        ("python", "raise ValueError('a rotten example')\n", False),
        ("yaml", "steps:\n- {type: quantize, scheme: w4, group_size: 64}\n", True),
        ("yaml", "steps:\n- {type: quantize, scheme: w5}\n", False),  # the recipe validates
        ("yaml", "steps: [unclosed\n", False),
    ],
)
def test_runner_passes_good_blocks_and_fails_broken_ones(runner, lang, code, ok):
    result = runner.run(_block(lang, code))
    assert result.ok is ok, result.error or result.output


def test_runner_keeps_variables_and_a_namespace_per_page(runner):
    assert runner.run(_block("bash", "NAME=w4-rtn\n.venv/bin/miaotui recipes --show $NAME\n")).output.count("w4") >= 1
    assert runner.run(_block("python", "shared = 41\n")).ok
    assert runner.run(_block("python", "assert shared + 1 == 42\n")).ok
    assert not runner.run(Block("other.md", 1, "python", "shared\n")).ok  # another page, another namespace


def test_a_broken_page_fails_and_skips_are_counted(runner, tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n.venv/bin/miaotui recipes\n```\n\n<!-- skip: needs a GPU -->\n```bash\nexit 1\n```\n\n"
        "```python\nprint(undefined_name)\n```\n"
    )
    report = run_pages([page], tmp_path, runner)
    assert [r.ok for r in report.results] == [True, False]
    assert "NameError" in report.results[1].error and report.results[1].block.where == "page.md:10"
    assert [b.skip for b in report.skipped] == ["needs a GPU"]


def test_doctest_fences_for_the_api_reference():
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        from griffe_doctests import fence_doctests
    finally:
        sys.path.pop(0)
    text = "Example:\n\n    >>> x = {'a': [1]}\n    >>> x['a'][0]\n    1\n\nMore."
    assert fence_doctests(text) == (
        "Example:\n\n    ```pycon\n    >>> x = {'a': [1]}\n    >>> x['a'][0]\n    1\n    ```\n\nMore."
    )
    assert fence_doctests("```python\n>>> 1\n```") == "```python\n>>> 1\n```"  # already fenced


# Every page of the site


@pytest.fixture(scope="session")
def docs_run(tmp_path_factory):
    """Every block of every page, in navigation order, in one work folder (pages use what earlier pages wrote)."""
    root = tmp_path_factory.mktemp("docs")
    report = run_pages(nav_pages(), REPO, Runner(make_work(root)))
    (root / "summary.txt").write_text(report.summary())
    print(report.summary())
    return report


@pytest.mark.slow
@pytest.mark.parametrize("page", [str(p.relative_to(REPO)) for p in nav_pages()])
def test_page_examples_run(docs_run, page):
    failed = [r for r in docs_run.results if r.block.path == page and not r.ok]
    assert not failed, "\n".join(f"{r.block.where}: {r.error}\n{r.block.code}" for r in failed)


@pytest.mark.slow
def test_most_examples_run(docs_run):
    ran = [r for r in docs_run.results if r.block.lang in ("bash", "python")]
    assert len(ran) >= FEWEST_RUN, docs_run.summary()
    pages = {str(p.relative_to(DOCS)) for p in nav_pages()}
    running = {str(Path(r.block.path).relative_to("docs")) for r in docs_run.results}
    silent = {p for p in pages - running if not p.startswith("benchmarks/")}
    assert silent <= SILENT_PAGES, f"pages that run no example: {sorted(silent - SILENT_PAGES)}"
