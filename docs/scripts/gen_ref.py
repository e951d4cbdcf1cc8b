"""Generate the reference pages from the code, at every `mkdocs build` (mkdocs-gen-files), so they cannot drift:

- reference/cli.md: the help of `miaotui` and of every subcommand, from the argparse parsers;
- reference/api.md: one mkdocstrings entry per name of `miaotui.api.__all__`, grouped by task;
- reference/recipe-schema.md: the recipe file format, every registered step type with its fields (type, default
  and the comment beside each field of its dataclass), and the built-in recipes;
- reference/models.md: the hand-written page, followed by the table of the families the tests cover
  (tests/families.py).

Run directly (`python docs/scripts/gen_ref.py OUT_DIR`) to write the pages to a folder for a look.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import re
import sys
import textwrap
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal's width: fix it so pages do not depend on it

# Names of miaotui.api.__all__ by task; a name missing here lands under "Other", a name not exported fails the build.
API_GROUPS = {
    "Loading, saving, describing": ["load", "save", "info", "LoadedModel", "default_model"],
    "Recipes and the main job": ["optimize", "apply_recipe", "Recipe", "get_recipe", "load_recipe"],
    "Techniques (one verb each, in place)": [
        "QuantizeConfig",
        "quantize_",
        "PruneConfig",
        "prune_",
        "FactorizeConfig",
        "factorize_",
    ],
    "The engine": ["Engine", "SamplingParams", "Completion", "ParallelConfig", "start_parallel"],
    "Measuring and reports": [
        "perplexity",
        "compare_causal",
        "embedding_similarity",
        "classify",
        "read_labelled",
        "bench_models",
        "bench_sweep",
        "compare",
        "read_report",
        "render_folder",
    ],
    "Autotune": ["autotune", "AutotuneConfig", "SearchSpace"],
    "Export": ["export"],
}
LAYERS_MARK = "<!-- layers -->"  # in design.md: replaced by the import-linter layers contract
STEP_ORDER = ("quantize", "smooth", "prune", "slim", "factorize", "distill")  # then any other registered step
API_DATA = {"BUILTIN_RECIPES": "the built-in recipes by name; listed in the [recipe schema](recipe-schema.md)"}


def cli_page() -> str:
    from miaotui.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [
        "# Command line",
        "",
        "Generated from the argparse parsers at every build of this site (`docs/scripts/gen_ref.py`), so it is the",
        "`--help` of the installed version. Every command takes `--dtype` and `--device`; bad input exits with status",
        "2 and one line on stderr (see [Environment and errors](environment.md)).",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
        "",
    ]
    for name, command in sub.choices.items():
        out += [f"## miaotui {name}", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def api_page() -> str:
    from miaotui import api

    exported = set(api.__all__)
    grouped = [n for names in API_GROUPS.values() for n in names]
    stale = sorted(set(grouped) - exported)
    if stale:
        raise SystemExit(f"gen_ref.py: API_GROUPS names {stale}, which miaotui.api.__all__ does not export")
    groups = dict(API_GROUPS)
    other = sorted(exported - set(grouped) - set(API_DATA))
    if other:
        groups["Other"] = other
    out = [
        "# Python API",
        "",
        "Everything below is importable from the package itself (`import miaotui; miaotui.load(...)`): the names of",
        "`miaotui.api.__all__`, rendered from their docstrings at every build of this site. The",
        "[Getting started](../getting-started.md#from-python) page shows them at work.",
        "",
    ]
    for data, what in API_DATA.items():
        out.append(f"`miaotui.{data}`: {what}.")
    out.append("")
    for title, names in groups.items():
        out += [f"## {title}", ""]
        for name in names:
            obj = getattr(api, name)
            path = f"{obj.__module__}.{obj.__qualname__}"
            out += [f"::: {path}", "    options:", f"      heading: miaotui.{name}", f"      toc_label: {name}", ""]
    return "\n".join(out)


def _type_name(hint) -> str:
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return text.replace("typing.", "")


def _field_comments(cls) -> dict[str, str]:
    """The comment beside each field of a dataclass (or in the comment lines just above it)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[str, str] = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        line = lines[node.lineno - 1]
        text = ""
        if "#" in line[node.end_col_offset :]:
            text = line[node.end_col_offset :].split("#", 1)[1].strip()
        else:
            above, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            text = " ".join(above)
        comments[node.target.id] = text
    return comments


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`".replace("|", "\\|")


def _accepted(cls, field: str, hint) -> str:
    """What the step's own validation says to a bad value of `field`: its allowed values, in the code's words."""
    text = str(hint)
    bad = ("",) if "tuple" in text else "maybe" if hint is bool else "?" if hint is str else -1
    try:
        cls(**{field: bad})
    except (ValueError, TypeError) as e:
        message = str(e).split(": ", 1)[-1]
        message = re.sub(r", got .*$", "", message)
        message = re.sub(rf"^{field} (.*? is not supported; )?(must be )?", "", message)
        return message
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def schema_page() -> str:
    import miaotui  # noqa: F401  registers every step type
    from miaotui.recipe import BUILTIN_RECIPES, RECIPE_VERSION, STEP_TYPES, get_recipe

    out = [
        "# Recipe schema",
        "",
        "Generated from the step configs' dataclasses at every build of this site (`docs/scripts/gen_ref.py`): the",
        "fields, their types and defaults are the code's. A recipe is YAML or JSON:",
        "",
        "| key | meaning |",
        "|---|---|",
        f"| `miaotui_recipe` | format version (this miaotui reads 1 to {RECIPE_VERSION}; optional, default "
        f"{RECIPE_VERSION}) |",
        "| `name` | a name for reports (optional) |",
        "| `description` | one line for reports (optional) |",
        "| `steps` | the list of steps, applied in order; each is a mapping with `type` and that step's fields |",
        "",
        "Unknown keys, step types or fields are refused with the allowed names, and every step validates its values",
        "when the recipe is read, before any model loads. Tuple fields (`targets`, `ignore`) are YAML lists of glob",
        "patterns on module names. How to write one: the [recipes guide](../guides/recipes.md).",
        "",
        "## Step types",
        "",
    ]
    order = {name: i for i, name in enumerate(STEP_ORDER)}
    for name, cls in sorted(STEP_TYPES.items(), key=lambda item: order.get(item[0], len(order))):
        doc = inspect.getdoc(cls) or ""
        doc = doc.split("\n>>>", 1)[0].strip()  # the doctest examples stay in the code
        hints = typing.get_type_hints(cls)
        comments = _field_comments(cls)
        out += [
            f"### `{name}`",
            "",
            f"`{cls.__module__}.{cls.__qualname__}`",
            "",
            doc,
            "",
            "| field | type | default | accepted | notes |",
            "|---|---|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            type_text = _cell(_type_name(hints[f.name]))
            accepted = _cell(_accepted(cls, f.name, hints[f.name]))
            notes = _cell(comments.get(f.name, ""))
            out.append(f"| `{f.name}` | `{type_text}` | {_default(f)} | {accepted} | {notes} |")
        out.append("")
    out += [
        "## Built-in recipes",
        "",
        "`miaotui recipes` lists them and `miaotui recipes --show NAME` prints one as YAML, a starting point for your",
        "own file. `auto` (the default of `optimize`) picks `w8` for causal LMs and `w8a8` for encoders.",
        "",
        "| recipe | steps | what it does |",
        "|---|---|---|",
    ]
    for name, data in BUILTIN_RECIPES.items():
        recipe = get_recipe(name)
        steps = "<br>".join(_cell(_flow(s.to_dict(), data["steps"][i])) for i, s in enumerate(recipe.steps))
        out.append(f"| `{name}` | {steps} | {_cell(data['description'])} |")
    out.append("")
    return "\n".join(out)


def _flow(full: dict, given: dict) -> str:
    """A step as written in the built-in recipe: `{type: quantize, scheme: w4, ...}` (its explicit fields)."""
    return "`{" + ", ".join(f"{k}: {_yaml_value(full.get(k, v))}" for k, v in given.items()) + "}`"


def _yaml_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list | tuple):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def models_table() -> str:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import families
    finally:
        sys.path.pop(0)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    kinds = [
        ("decoders", sorted(set(families.CORE + families.DECODERS) - families.ENCODER_TYPES)),
        ("mixtures of experts", sorted(families.MOE)),
        ("encoders", sorted(families.ENCODER_TYPES)),
        ("classifiers", sorted(families.CLASSIFIERS)),
    ]
    out = [
        "",
        "## Families tested end to end",
        "",
        "Generated from `tests/families.py` at every build of this site: the families `tests/test_families.py` builds",
        "as tiny random models (2 blocks, hidden size 64) and runs through `info`, every built-in recipe with exact",
        "reload (or its refusal by name), the engine against Hugging Face `generate`, the compressed-tensors export",
        "and `miaotui serve`.",
        "",
        "| kind | family (`model_type`) | config class | model class the tests build |",
        "|---|---|---|---|",
    ]
    for kind, names in kinds:
        for family in names:
            model_type = families.model_type(family)
            if family in families.CLASSIFIERS:
                cls = families.tiny_config(family).architectures[0]
            elif family in families.ENCODER_TYPES:
                cls = MODEL_MAPPING_NAMES.get(model_type, "")
            else:
                cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")
            config = CONFIG_MAPPING_NAMES.get(model_type, "")
            out.append(f"| {kind} | `{family}` | `{config}` | `{cls}` |")
    total = sum(len(n) for _, n in kinds)
    out += ["", f"{total} families in all.", ""]
    return "\n".join(out)


def layers_list() -> str:
    """The import-linter layers contract of pyproject.toml as a numbered list, top (may import all below) first."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    out = []
    for contract in config["contracts"]:
        if contract["type"] != "layers":
            continue
        out += [f"Contract *{contract['name']}*:", ""]
        for i, layer in enumerate(contract["layers"], 1):
            names = " · ".join(f"`{m.strip()}`" for m in layer.split("|"))
            out.append(f"{i}. {names}")
        out.append("")
    if not out:
        raise SystemExit("gen_ref.py: pyproject.toml declares no import-linter layers contract")
    return "\n".join(out)


def generate(open_file) -> None:
    with open_file("reference/cli.md", "w") as f:
        f.write(cli_page())
    with open_file("reference/api.md", "w") as f:
        f.write(api_page())
    with open_file("reference/recipe-schema.md", "w") as f:
        f.write(schema_page())
    with open_file("reference/models.md", "a") as f:
        f.write(models_table())
    with open_file("design.md", "r") as f:
        design = f.read()
    if LAYERS_MARK not in design:
        raise SystemExit(f"gen_ref.py: design.md lost its {LAYERS_MARK} line, where the layers contract goes")
    with open_file("design.md", "w") as f:
        f.write(design.replace(LAYERS_MARK, layers_list()))


if __name__ == "__main__":  # python docs/scripts/gen_ref.py OUT_DIR
    root = Path(sys.argv[1])

    def _open(name: str, mode: str) -> io.TextIOBase:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if mode in ("a", "r") and not path.exists() and (REPO / "docs" / name).exists():
            path.write_text((REPO / "docs" / name).read_text())
        return open(path, mode, encoding="utf-8")

    generate(_open)
else:  # run by mkdocs-gen-files during the build
    import mkdocs_gen_files

    generate(mkdocs_gen_files.open)
