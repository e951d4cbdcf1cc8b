import json

import pytest
import yaml

import miaotui  # noqa: F401  (registers the step types)
from miaotui.errors import MiaotuiError
from miaotui.quantize import QuantizeConfig
from miaotui.recipe import BUILTIN_RECIPES, Recipe, get_recipe, load_recipe


@pytest.mark.parametrize("name", list(BUILTIN_RECIPES))
def test_builtin_recipes_round_trip(name):
    r = get_recipe(name)
    assert r.name == name
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert Recipe.from_dict(json.loads(r.to_json())) == r
    assert r.to_dict()["miaotui_recipe"] == 1


def test_recipe_file_yaml_and_json(tmp_path):
    r = Recipe(steps=(QuantizeConfig(scheme="w8", ignore=("lm_head", "*.0.mlp.*")),), name="mine")
    (tmp_path / "r.yaml").write_text(r.to_yaml())
    (tmp_path / "r.json").write_text(r.to_json())
    assert load_recipe(tmp_path / "r.yaml") == r
    assert get_recipe(str(tmp_path / "r.json")) == r


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "w5"}, "scheme 'w5' is not supported; choose one of w8, w8a8"),
        ({"algorithm": "magic"}, "algorithm 'magic' is not supported"),
        ({"targets": ()}, "targets must name at least one pattern"),
        ({"ignore": ("",)}, "ignore must be a list of non-empty glob patterns"),
    ],
)
def test_quantize_config_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizeConfig(**kwargs)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": [{"type": "no-such-step"}]}, "unknown step type 'no-such-step'; known: .*quantize"),
        ({"steps": [{"type": "quantize", "bits": 4}]}, "unknown field\\(s\\) bits; allowed: scheme"),
        ({"steps": [{"type": "quantize", "ignore": "lm_head"}]}, "field ignore must be a list"),
        ({"steps": []}, "at least one step"),
        ({"steps": "w8"}, "needs a 'steps' list"),
        ({"miaotui_recipe": 99, "steps": []}, "version 99 is not supported"),
        ({"stepz": []}, "unknown recipe key\\(s\\) stepz"),
        (["w8"], "must be a mapping"),
    ],
)
def test_invalid_recipes_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(data)


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [{type: quantize, scheme: w5}]")
    with pytest.raises(MiaotuiError, match="invalid recipe .*bad.yaml: quantize: scheme 'w5'"):
        load_recipe(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [unclosed")
    with pytest.raises(MiaotuiError, match="cannot read recipe"):
        load_recipe(broken)
    with pytest.raises(MiaotuiError, match="unknown recipe 'nope': not a built-in"):
        get_recipe("nope")


def test_recipe_files_may_not_use_yaml_anchors_or_aliases(tmp_path):
    aliased = tmp_path / "aliased.yaml"
    aliased.write_text("steps:\n  - &step {type: quantize, scheme: w8}\n  - *step\n")
    with pytest.raises(MiaotuiError, match=r"aliased.yaml: recipe files may not use YAML anchors/aliases .* line 2"):
        load_recipe(aliased)
    with pytest.raises(yaml.YAMLError, match="anchors/aliases"):
        Recipe.from_yaml(aliased.read_text())
    deep = tmp_path / "deep.yaml"
    deep.write_text("steps: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(MiaotuiError, match="deep.yaml: it is nested too deeply"):
        load_recipe(deep)
    step = QuantizeConfig(scheme="w8", ignore=("lm_head",))
    twice = Recipe(steps=(step, step), name="twice")  # the same values twice: written out in full, read back
    assert "&" not in twice.to_yaml() and Recipe.from_yaml(twice.to_yaml()) == twice
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: plain\nsteps:\n  - {type: quantize, scheme: w8, ignore: [lm_head]}\n")
    assert load_recipe(plain) == Recipe(steps=(step,), name="plain")
