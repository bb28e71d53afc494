"""Every shipped config parses, validates and passes the trainer's preflight (no weights loaded): a config that
drifts from the options fails here, not after a user has waited for the models to load."""

from pathlib import Path

import pytest

from stepdistill.config import parse_config
from stepdistill.methods import get_method
from stepdistill.preflight import preflight

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train_scripts" / "configs" / "tiny_digits"
METHOD_OF = {"lcm_lora": "lcm", "tscd": "tscd", "dmd2": "dmd2", "dmd2_4step": "dmd2", "sid": "sid", "sid_4step": "sid",
             "agd": "agd", "msd": "msd", "tscd_then_dm": "stages", "dmd2_then_msd": "stages", "fdistill_js": "dmd2", "uni_instruct_fkl": "sid"}


def test_every_shipped_config_is_covered():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(METHOD_OF)


@pytest.mark.parametrize("name", sorted(METHOD_OF))
def test_shipped_config_passes_preflight(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name assets/ relative to the repository root, as the README runs them
    if METHOD_OF[name] == "stages":  # a pipeline: every stage parsed and checked (preflight) before any trains
        from stepdistill.stages import check_stages, load_stages

        argv = ["--config", str(CONFIGS / f"{name}.yaml"), "--output_dir", str(tmp_path / "out")]
        stages, _ = load_stages(argv)
        check_stages(stages, argv[1])
        assert all(s.config.max_train_steps >= 1 for s in stages)
        return
    if METHOD_OF[name] == "msd":  # K students of a DM method: the method's options plus MSD's
        from stepdistill.msd.train import msd_config_class

        config_class, method = msd_config_class("dmd2"), get_method("dmd2")
    else:
        method = get_method(METHOD_OF[name])
        config_class = method.config_class
    config = parse_config(config_class, ["--config", str(CONFIGS / f"{name}.yaml"), "--output_dir", str(tmp_path / "out")])
    preflight(config, method)
    assert config.max_train_steps >= 1


@pytest.mark.parametrize("path", sorted([*CONFIGS.glob("*.yaml"),
                                    *(REPO / "train_scripts" / "configs").glob("sd*/*.yaml")]),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_config_names_what_it_trains(path):
    """`stepdistill train --config FILE --output_dir DIR` runs any shipped config: each names its method (method:)
    or its stages (stages:), and the method's own parser takes the file with that key."""
    from stepdistill.stages import method_of_config

    named = method_of_config(["--config", str(path)])
    expected = METHOD_OF[path.stem] if path.parent == CONFIGS else RECIPE_METHOD[path.stem]
    assert named == expected
    if named in ("stages", "msd") or path.parent != CONFIGS:  # the SD recipes: parsed with data below
        return
    config = parse_config(get_method(named).config_class, ["--config", str(path), "--output_dir", "unused"],
                          method=named)
    assert config.max_train_steps >= 1


def test_the_pipeline_config_is_tscd_then_dm_on_one_lora():
    """tscd_then_dm.yaml: its TSCD stage is tscd.yaml's run, its DM stage dmd2.yaml's one-step recipe on the LoRA."""
    from stepdistill.stages import load_stages

    stages, out = load_stages(["--config", str(CONFIGS / "tscd_then_dm.yaml"), "--output_dir", "runs/x"])
    assert [(s.name, s.method) for s in stages] == [("tscd", "tscd"), ("dm", "dmd2")]
    tscd, dm = (s.config for s in stages)
    single = parse_config(get_method("tscd").config_class, ["--config", str(CONFIGS / "tscd.yaml"),
                                                             "--output_dir", "unused"], method="tscd")
    skip = {"output_dir", "resume_from_checkpoint"}
    assert {k: v for k, v in vars(tscd).items() if k not in skip} == {k: v for k, v in vars(single).items()
                                                                       if k not in skip}
    assert tscd.segments == [8, 4, 2] and dm.use_lora and dm.lora_rank == tscd.lora_rank == 16
    assert dm.conditioning_timestep == 625 and not dm.denoising_timesteps and dm.gan
    assert dm.init_from_output == str(out / "stages" / "0-tscd") and tscd.init_from_output is None


def test_dmd2_one_step_config_samples_where_it_trains():
    config = parse_config(get_method("dmd2").config_class, ["--config", str(CONFIGS / "dmd2.yaml"), "--output_dir", "unused"])
    assert config.conditioning_timestep == 625 and not config.denoising_timesteps


@pytest.mark.parametrize("name, steps", [("sid", [625]), ("sid_4step", [625, 468, 312, 156])])
def test_sid_configs_learn_from_prompts_and_use_images_only_for_the_gan(name, steps):
    from stepdistill.methods.sid import sid_timesteps

    config = parse_config(get_method("sid").config_class, ["--config", str(CONFIGS / f"{name}.yaml"), "--output_dir", "unused"])
    assert config.prompts_file and config.gan and config.train_data_dir == "builtin:tiny-digits"
    assert config.init_noise == "unit"  # so the stock LCMScheduler call reproduces the training sampler
    assert sid_timesteps(config.init_timestep, config.num_steps) == steps


def test_agd_config_covers_the_guidance_scales_it_is_scored_at():
    config = parse_config(get_method("agd").config_class, ["--config", str(CONFIGS / "agd.yaml"), "--output_dir", "unused"])
    lo, hi = config.guidance_range
    assert lo <= 1 and hi >= 5 and config.trajectory_steps == 25  # scored at w = 1, 2, 3, 5 and 25 steps


def test_msd_config_is_the_single_dmd2_run_per_student():
    """msd.yaml changes nothing but the partition: K = 1 is exactly dmd2.yaml (tests/test_msd_train.py shows that an
    MSD run of one student equals the single run bit for bit)."""
    import dataclasses

    from stepdistill.msd.train import MSDOptions, msd_config_class

    msd = parse_config(msd_config_class("dmd2"), ["--config", str(CONFIGS / "msd.yaml"), "--output_dir", "unused"])
    dmd2 = parse_config(get_method("dmd2").config_class, ["--config", str(CONFIGS / "dmd2.yaml"), "--output_dir", "unused"])
    own = {f.name for f in dataclasses.fields(MSDOptions)}
    assert {f.name: getattr(msd, f.name) for f in dataclasses.fields(dmd2)} == dataclasses.asdict(dmd2)
    assert msd.num_students == 4 and msd.partition == "classes" and len(msd.partition_classes) == 10 and own


# ------------------------------------------------------------------------------------------ SD 1.5 / SDXL recipes
RECIPES = REPO / "train_scripts" / "configs"
REAL_CONFIGS = REPO / "assets" / "real_configs"
# the hub ids the recipes name, and the committed config files that stand in for them (no weights: preflight reads
# configs alone)
HUB_FIXTURES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
                "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
                "madebyollin/sdxl-vae-fp16-fix": "sdxl-vae-fp16-fix"}
RECIPE_METHOD = {"lcm_lora": "lcm", "lcm": "lcm", "tscd": "tscd", "dmd2": "dmd2", "dmd2_gan": "dmd2", "dmd2_4step_lora": "dmd2",
                 "sid": "sid", "sid_4step": "sid", "agd": "agd", "msd": "msd"}


def recipe_files() -> list[Path]:
    return sorted(p for model in ("sd15", "sdxl") for p in (RECIPES / model).glob("*.yaml"))


def fake_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding the recipes' base models as their config files alone, so the preflight reads
    the hub-id path offline exactly as on a user's machine after `hf download`."""
    import shutil

    revision = "0" * 40
    for repo_id, fixture in HUB_FIXTURES.items():
        repo = root / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(REAL_CONFIGS / fixture, repo / "snapshots" / revision)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    return root


def recipe_config(path: Path, tmp_path: Path, monkeypatch):
    """The recipe parsed with a data source of the kind its method reads (the recipes name none: the user's data) and
    the fake hub cache."""
    import yaml

    name = path.stem
    method_name = RECIPE_METHOD[name]
    if method_name == "msd":
        from stepdistill.msd.train import msd_config_class

        inner = yaml.safe_load(path.read_text()).get("student_method", "dmd2")
        config_class, method = msd_config_class(inner), get_method(inner)
    else:
        method = get_method(method_name)
        config_class = method.config_class
    data = tmp_path / "data"
    data.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--config", str(path), "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(fake_hub_cache(tmp_path / "hub"))]
    gan = bool(yaml.safe_load(path.read_text()).get("gan"))
    if method.name in ("lcm", "tscd") or gan:  # images: the consistency methods' data, the GAN's real samples
        argv += ["--train_data_dir", str(data)]
    if method.name in ("sid", "agd") or (method.name == "dmd2" and not gan):  # prompts alone
        argv += ["--prompts_file", str(prompts)]
    return parse_config(config_class, argv, method="msd" if method_name == "msd" else method.name), method


def test_every_recipe_is_covered():
    assert recipe_files() and {p.stem for p in recipe_files()} <= set(RECIPE_METHOD)
    assert {p.parent.name for p in recipe_files()} == {"sd15", "sdxl"}


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_passes_preflight_against_the_real_configs(path, tmp_path, monkeypatch):
    """Each recipe, as a user runs it (hub ids, no local paths), passes every check the trainer makes before weights
    load, against the committed public configs: resolution against the VAE and UNet, precision, VAE, schedule."""
    config, method = recipe_config(path, tmp_path, monkeypatch)
    preflight(config, method)
    model = HUB_FIXTURES[config.pretrained_model_name_or_path]
    native = 1024 if model == "sdxl" else 512
    assert config.resolution == native  # the base model's own resolution, read from its configs
    assert config.max_train_steps >= 1000 and config.validation_prompts
