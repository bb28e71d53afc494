"""The config layer: typed list options (list[int] / list[float] / list[str]) from YAML and the command line, one-line
errors naming the option and the bad item, and the Python-values-to-argv bridge the API uses."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from stepdistill.config import TrainConfig, option, options_to_argv, parse_config
from stepdistill.errors import StepdistillError


@dataclass
class ListsConfig:
    """Only list options."""

    segments: list[int] = option([8, 4, 2, 1], "ints")
    weights: list[float] = option([], "floats")
    prompts: list[str] = option([], "strings")
    untyped: list = option([], "a plain list (the method configs' annotation until they switch)")
    maybe: list[int] | None = option(None, "optional ints")


def _yaml(tmp_path, text: str) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return ["--config", str(path)]


def test_command_line_lists_are_parsed_to_their_element_type():
    config = parse_config(ListsConfig, ["--segments", "8, 4,2", "--weights", "0.5,1", "--prompts", "a cat|a dog",
                                        "--untyped", "8,4", "--maybe", "3"])
    assert config.segments == [8, 4, 2] and all(type(v) is int for v in config.segments)
    assert config.weights == [0.5, 1.0] and all(type(v) is float for v in config.weights)
    assert config.prompts == ["a cat", "a dog"]
    assert config.untyped == ["8", "4"]  # untyped lists keep the strings, as before
    assert config.maybe == [3]


def test_strings_with_commas_use_the_bar():
    assert parse_config(ListsConfig, ["--prompts", "a cat, sitting|a dog"]).prompts == ["a cat, sitting", "a dog"]
    assert parse_config(ListsConfig, ["--prompts", "a cat, sitting|"]).prompts == ["a cat, sitting"]
    assert parse_config(ListsConfig, ["--prompts", "a,b,c"]).prompts == ["a", "b", "c"]
    assert parse_config(ListsConfig, ["--prompts", ""]).prompts == []


def test_yaml_lists_are_converted_too(tmp_path):
    argv = _yaml(tmp_path, "segments: [8, '4', 2.0]\nweights: [1, '2.5']\nprompts: [a cat, 7]\nuntyped: [1, x]\n")
    config = parse_config(ListsConfig, argv)
    assert config.segments == [8, 4, 2] and all(type(v) is int for v in config.segments)
    assert config.weights == [1.0, 2.5]
    assert config.prompts == ["a cat", "7"]
    assert config.untyped == [1, "x"]
    assert parse_config(ListsConfig, _yaml(tmp_path, "segments: 4,2\n")).segments == [4, 2]
    assert parse_config(ListsConfig, argv + ["--segments", "2"]).segments == [2]  # the command line wins


@pytest.mark.parametrize("argv, message", [
    (["--segments", "8,x"], "--segments 8,x: 'x' is not an integer"),
    (["--segments", "8,2.5"], "--segments 8,2.5: '2.5' is not an integer"),
    (["--weights", "1,half"], "--weights 1,half: 'half' is not a number"),
])
def test_a_bad_item_on_the_command_line_is_one_line_naming_option_and_item(argv, message):
    with pytest.raises(StepdistillError) as e:
        parse_config(ListsConfig, argv)
    assert str(e.value) == message


@pytest.mark.parametrize("text, message", [
    ("segments: [8, x]\n", "option 'segments': 'x' is not an integer"),
    ("segments: [8, 2.5]\n", "option 'segments': 2.5 is not an integer"),
    ("segments: [8, true]\n", "option 'segments': True is not an integer"),
    ("weights: [1, {a: 1}]\n", "option 'weights': {'a': 1} is not a number"),
    ("prompts: [a, [b]]\n", "option 'prompts': ['b'] is not a string"),
    ("segments: {a: 1}\n", "option 'segments': expected a list"),
])
def test_a_bad_item_in_yaml_names_the_file_option_and_item(text, message, tmp_path):
    with pytest.raises(StepdistillError, match="c.yaml: ") as e:
        parse_config(ListsConfig, _yaml(tmp_path, text))
    assert message in str(e.value)


def test_validation_prompts_are_a_list_of_strings(tmp_path):
    config = parse_config(TrainConfig, ["--validation_prompts", "a digit, seven|the number 7"])
    assert config.validation_prompts == ["a digit, seven", "the number 7"]
    config = parse_config(TrainConfig, _yaml(tmp_path, "validation_prompts: [seven, 7]\n"))
    assert config.validation_prompts == ["seven", "7"]
    assert parse_config(TrainConfig, []).validation_prompts == []


def test_command_line_errors_raise_one_line_naming_help():
    with pytest.raises(StepdistillError, match=r"^unrecognized arguments: --segmnets 4 \(see --help\)$"):
        parse_config(ListsConfig, ["--segmnets", "4"])
    with pytest.raises(StepdistillError, match=r"^argument --max_train_steps: invalid int value: 'many'"):
        parse_config(TrainConfig, ["--max_train_steps", "many"])


def test_python_values_become_the_command_line_that_sets_them():
    options = {"segments": [8, 4], "weights": (0.1, 1e-4), "prompts": ["a, b"], "untyped": [], "maybe": None}
    argv = options_to_argv(options)
    assert "--maybe" not in argv  # None leaves the option to the YAML file or its default
    config = parse_config(ListsConfig, argv)
    assert (config.segments, config.weights, config.prompts, config.untyped) == ([8, 4], [0.1, 1e-4], ["a, b"], [])
    assert parse_config(ListsConfig, options_to_argv({"prompts": ["a, b", "c"]})).prompts == ["a, b", "c"]
    config = parse_config(TrainConfig, options_to_argv({"use_lora": False, "output_dir": Path("x/y"),
                                                        "learning_rate": 1 / 3, "cache_latents": True}))
    assert (config.use_lora, config.output_dir, config.learning_rate, config.cache_latents) == (False, "x/y", 1 / 3,
                                                                                                True)
    with pytest.raises(StepdistillError, match=r"--prompts: an item holds '\|'"):
        options_to_argv({"prompts": ["a|b"]})
