"""train_scripts/bench_dm.py builds the two variants it compares as it claims: the separate-copy real score is another
module computing exactly what the shared UNet computes with its adapters off; the shared variant holds no second
teacher."""

import importlib.util

import pytest
import torch
from conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_dm", REPO / "train_scripts" / "bench_dm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copy_variant_holds_a_second_frozen_teacher_shared_holds_none(bench, tiny_sd_path, tmp_path):
    argv = bench.config_argv("dmd2", tiny_sd_path, tmp_path, batch_size=2, max_train_steps=1, rank=4)
    shared, separate = bench.build_method("dmd2", "shared", argv), bench.build_method("dmd2", "copy", argv)

    # shared: the real score is the generator's own UNet; only it and the fake score's UNet are held
    with shared.teacher_mode() as real:
        assert real is shared.networks["generator"] is shared.teacher.unet
    assert {id(u) for u in bench.held_unets(shared)} == {id(shared.teacher.unet),
                                                          id(shared.networks["fake_score"].unet)}
    assert bench.check_variant(shared, "shared")["unets_held"] == 2

    # copy: a third UNet, a different object, equal to the base UNet with adapters disabled
    generator = separate.networks["generator"]
    with torch.no_grad():  # a trained-looking LoRA (B starts at zero), so that adapters on and off differ
        for name, p in generator.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    with separate.teacher_mode() as real:
        real_score = real
    assert real_score is not generator and real_score is not separate.networks["fake_score"].unet
    assert bench.check_variant(separate, "copy")["unets_held"] == 3

    latent = int(generator.config.sample_size)
    x, t = torch.randn(2, 4, latent, latent), torch.tensor([999, 400])
    cond = separate.conditioning(["a digit", "the number one"])
    teacher = separate.teacher
    with torch.no_grad():
        lora_on = teacher.predict(x, t, cond, unet=generator)
        generator.disable_adapters()
        adapters_off = teacher.predict(x, t, cond, unet=generator)
        generator.enable_adapters()
        copy_out = teacher.predict(x, t, cond, unet=real_score)
    assert torch.equal(copy_out, adapters_off)
    assert not torch.allclose(lora_on, adapters_off, atol=1e-3)
