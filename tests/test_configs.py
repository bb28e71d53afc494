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
             "agd": "agd", "msd": "msd"}


def test_every_shipped_config_is_covered():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(METHOD_OF)


@pytest.mark.parametrize("name", sorted(METHOD_OF))
def test_shipped_config_passes_preflight(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name assets/ relative to the repository root, as the README runs them
    if METHOD_OF[name] == "msd":  # K students of a DM method: the method's options plus MSD's
        from stepdistill.msd.train import msd_config_class

        config_class, method = msd_config_class("dmd2"), get_method("dmd2")
    else:
        method = get_method(METHOD_OF[name])
        config_class = method.config_class
    config = parse_config(config_class, ["--config", str(CONFIGS / f"{name}.yaml"), "--output_dir", str(tmp_path / "out")])
    preflight(config, method)
    assert config.max_train_steps >= 1


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
