import os

# Tests never reach a model hub: a missing local file must fail fast instead of trying a download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "assets" / "tiny-digits-sd"


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from stepdistill.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd2_v_path(tmp_path_factory):
    from stepdistill.testing import build_tiny_sd2_v

    return build_tiny_sd2_v(tmp_path_factory.mktemp("tiny_sd2"))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    from stepdistill.testing import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def toy_path():
    if not (TOY / "model_index.json").is_file():
        pytest.fail(f"{TOY} is missing: run `stepdistill toy build`")
    return TOY


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The digits as an image folder with metadata.jsonl (what `stepdistill toy export-data` writes)."""
    from stepdistill.toy.export import export_data

    return export_data(tmp_path_factory.mktemp("digits") / "data")


def train_args(model, data_dir, output_dir, **overrides) -> list[str]:
    """Command-line arguments of a short CPU training run."""
    args = {"pretrained_model_name_or_path": model, "train_data_dir": data_dir, "output_dir": output_dir,
            "max_train_steps": 4, "train_batch_size": 4, "lora_rank": 4, "checkpointing_steps": 0,
            "max_train_samples": 64, **overrides}
    out = []
    for k, v in args.items():
        if v is None:
            continue
        out += [f"--{k}", ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return out


def read_logs(output_dir) -> list[dict]:
    """A run's ``logs.jsonl``: one dict per logged step."""
    import json

    return [json.loads(line) for line in (Path(output_dir) / "logs.jsonl").read_text().splitlines() if line.strip()]


def lora_before_after(pipeline_class, base, output_dir, prompt: str = "a digit", **call):
    """A stock pipeline's images (seed 0, the recipe's scheduler and call arguments, ``output_type="pt"``) before
    and after loading the output's LoRA the stock way (``pipe.load_lora_weights``)."""
    from stepdistill.recipe import Recipe

    recipe = Recipe.load(output_dir)
    pipe = pipeline_class.from_pretrained(base)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    kwargs = dict(recipe.call_kwargs(), output_type="pt", **call)
    before = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(output_dir)
    after = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    return before, after


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """A few prompts for the data-free distribution-matching runs."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a digit\nthe number one\na red digit\na small blue number\n")
    return path


def dm_args(model, out, data=None, prompts=None, **overrides) -> list[str]:
    """A short distribution-matching run: train_args, two steps, and --prompts_file when given."""
    overrides.setdefault("max_train_steps", 2)
    return train_args(model, data, out, **overrides) + (["--prompts_file", str(prompts)] if prompts else [])


def build_method(cls, argv):
    """A method object as the trainer builds it (config parsed, resolution checked), without training."""
    from stepdistill.config import parse_config
    from stepdistill.preflight import check_resolution
    from stepdistill.teacher import Teacher

    config = parse_config(cls.config_class, argv)
    check_resolution(config)
    return cls(config, Teacher.from_pretrained(config.pretrained_model_name_or_path))
