import pytest
import torch

from stepdistill.errors import StepdistillError
from stepdistill.teacher import Conditioning, Teacher


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    return Teacher.from_pretrained(str(tiny_sd_path))


@pytest.fixture(scope="module")
def sd2(tiny_sd2_v_path):
    return Teacher.from_pretrained(str(tiny_sd2_v_path))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path):
    return Teacher.from_pretrained(str(tiny_sdxl_path))


def test_schedule_is_the_pipelines_own(sd):
    abar = sd.scheduler.alphas_cumprod.double()
    # SD's scaled_linear betas, by hand: beta_i = (sqrt(0.00085) + i/999 (sqrt(0.012) - sqrt(0.00085)))^2
    i = torch.arange(1000, dtype=torch.float64)
    betas = (0.00085 ** 0.5 + i / 999 * (0.012 ** 0.5 - 0.00085 ** 0.5)) ** 2
    assert torch.allclose(sd.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-6)
    assert torch.allclose(sd.alphas_cumprod, abar, rtol=1e-6)
    x = torch.zeros(3, 4, 2, 2)
    a, s = sd.alpha_sigma(torch.tensor([0, 999, -1]), x)
    assert a.shape == (3, 1, 1, 1)
    assert torch.allclose(a.flatten() ** 2 + s.flatten() ** 2, torch.ones(3))
    assert a[2].item() == 1.0 and s[2].item() == 0.0  # t = -1 is clean data


def test_add_noise_matches_hand_formula(sd):
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    abar = sd.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    assert torch.allclose(sd.add_noise(x0, eps, t), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_type_round_trip(sd, kind):
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([50, 900])
    x_t = sd.add_noise(x0, eps, t)
    pred = sd.to_prediction(x0, eps, t, kind)
    x0_back, eps_back = sd.to_x0_eps(pred, x_t, t, kind)
    assert torch.allclose(x0_back, x0, atol=1e-8)
    assert torch.allclose(eps_back, eps, atol=1e-8)


def test_v_prediction_by_hand(sd2):
    assert sd2.prediction_type == "v_prediction"
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([400])
    abar = sd2.alphas_cumprod[400].item()
    v = abar ** 0.5 * eps - (1 - abar) ** 0.5 * x0
    x_t = sd2.add_noise(x0, eps, t)
    assert torch.allclose(sd2.to_prediction(x0, eps, t), v, atol=1e-6)
    assert torch.allclose(sd2.to_x0(v, x_t, t), x0, atol=1e-5)


def test_ddim_jump_with_exact_noise_returns_exact_noised_value(sd):
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t, t_next = torch.tensor([999, 759]), torch.tensor([759, 19])
    x_t = sd.add_noise(x0, eps, t)
    # a perfect ε-model: its output is the true noise
    x_next = sd.ddim_step(eps, x_t, t, t_next)
    assert torch.allclose(x_next, sd.add_noise(x0, eps, t_next), atol=1e-10)
    assert torch.allclose(sd.ddim_step(eps, x_t, t, torch.tensor([-1, -1])), x0, atol=1e-10)


def test_ddim_jump_equals_diffusers_ddim_scheduler(sd):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(sd.scheduler.config)
    sched.set_timesteps(4)
    t, t_prev = sched.timesteps[0], sched.timesteps[1]
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    ours = sd.ddim_step(eps, x, t.view(1), t_prev.view(1))
    theirs = sched.step(eps, t, x, eta=0.0).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_cfg_scale_one_is_conditional_and_batched_cfg_is_exact(sd):
    cond = sd.encode_prompt(["a red cat", "a blue dog"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 600])
    with torch.no_grad():
        c = sd.predict(x, t, cond)
        u = sd.predict(x, t, sd.uncond(2))
        assert torch.equal(sd.guided_predict(x, t, cond, 1.0), c)
        g = sd.guided_predict(x, t, cond, 4.0)
        assert torch.allclose(g, u + 4.0 * (c - u), atol=1e-5)
        per_sample = sd.guided_predict(x, t, cond, torch.tensor([1.0, 4.0]))
        assert torch.allclose(per_sample[0], c[0], atol=1e-5)
        assert torch.allclose(per_sample[1], g[1], atol=1e-5)


def test_cfg_is_one_unet_call(sd):
    calls = []
    handle = sd.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            sd.guided_predict(torch.randn(3, 4, 8, 8), torch.tensor([10]), sd.encode_prompt(["a cat"] * 3), 7.5)
    finally:
        handle.remove()
    assert calls == [6]


def test_prompt_cache_encodes_each_prompt_once(sd):
    calls = []
    handle = sd.pipe.text_encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        first = sd.encode_prompt(["a green tree", "a small house"])
        again = sd.encode_prompt(["a small house", "a green tree", "a small house"])
    finally:
        handle.remove()
    assert len(calls) == 1
    assert torch.equal(again.prompt_embeds[1], first.prompt_embeds[0])
    assert torch.equal(again[0].prompt_embeds, first[1].prompt_embeds)


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_prompt_cache_is_bounded_least_recently_used_in_host_memory(model, tiny_sd_path, tiny_sdxl_path):
    """Embeddings live in host memory (their own copies, not rows of a batch) and the cache holds at most
    prompt_cache_bytes: the least recently used go first, and a prompt encoded again is the same tensor."""
    teacher = Teacher.from_pretrained(str(tiny_sd_path if model == "sd" else tiny_sdxl_path))
    prompts = [f"a drawing of the digit {d}" for d in range(6)]
    reference = teacher.encode_prompt(prompts)
    one = teacher._prompt_cache[prompts[0]]
    per_prompt = sum(t.numel() * t.element_size() for t in one if t is not None)
    assert one[0].device.type == "cpu" and one[0].untyped_storage().nbytes() == one[0].numel() * one[0].element_size()

    bounded = Teacher.from_pretrained(str(tiny_sd_path if model == "sd" else tiny_sdxl_path))
    bounded.prompt_cache_bytes = 2 * per_prompt
    first = bounded.encode_prompt(prompts)
    assert list(bounded._prompt_cache) == prompts[-2:]  # the two most recent
    bounded.encode_prompt([prompts[4]])  # touched: now the most recent
    bounded.encode_prompt([prompts[0]])  # evicted long ago: encoded again, pushes out prompts[5]
    assert list(bounded._prompt_cache) == [prompts[4], prompts[0]]
    again = bounded.encode_prompt(prompts)
    # encoded in the same batches: bit for bit; encoded again in other batches: equal up to the text encoder's
    # batch-size rounding (SDXL's pooled projection differs in the last bit), the price of an eviction
    same = torch.equal
    for cond, match in ((first, same), (again, lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=0))):
        assert match(cond.prompt_embeds, reference.prompt_embeds)
        if model == "sdxl":
            assert match(cond.pooled_prompt_embeds, reference.pooled_prompt_embeds)


def test_encode_matches_the_pipelines_own_encoding(sd):
    ours = sd.encode_prompt(["a cat on the moon"]).prompt_embeds
    theirs, _ = sd.pipe.encode_prompt("a cat on the moon", "cpu", 1, False)
    assert torch.allclose(ours, theirs)


def test_sdxl_conditioning(sdxl):
    cond = sdxl.encode_prompt(["a cat", "a dog"])
    assert cond.pooled_prompt_embeds.shape == (2, 32)
    assert cond.prompt_embeds.shape == (2, 77, 64)
    assert cond.add_time_ids.tolist()[0] == [16, 16, 0, 0, 16, 16]
    unc = sdxl.uncond(2)
    assert unc.prompt_embeds.abs().max() == 0 and unc.pooled_prompt_embeds.abs().max() == 0
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        g = sdxl.guided_predict(x, torch.tensor([500]), cond, 5.0)
        c = sdxl.predict(x, torch.tensor([500]), cond)
        u = sdxl.predict(x, torch.tensor([500]), unc)
    assert torch.allclose(g, u + 5 * (c - u), atol=1e-5)


def test_conditioning_cat_and_repeat(sdxl):
    cond = sdxl.encode_prompt(["a cat"])
    both = Conditioning.cat([cond, cond.repeat(2)])
    assert len(both) == 3 and both.add_time_ids.shape == (3, 6)


def test_vae_round_trip_shapes(sd):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = sd.encode_images(images)
    assert latents.shape == (2, 4, 8, 8)
    assert sd.decode_latents(latents).shape == (2, 3, 16, 16)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(StepdistillError, match=r"not a Diffusers pipeline.*model_index\.json"):
        Teacher.from_pretrained(str(tmp_path))


def test_missing_local_path():
    with pytest.raises(StepdistillError, match="no such directory"):
        Teacher.from_pretrained("./does/not/exist")


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(StepdistillError,
                       match="KandinskyPipeline is not supported; supported: StableDiffusionPipeline"):
        Teacher.from_pretrained(str(tmp_path))


def test_incomplete_pipeline_folder_is_one_line(tmp_path):
    from stepdistill.preflight import check_resolution
    from stepdistill.teacher import check_pipeline

    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert check_pipeline(str(tmp_path)) == "sd"
    config = type("C", (), {"pretrained_model_name_or_path": str(tmp_path), "revision": None, "resolution": None})
    with pytest.raises(StepdistillError, match=r"has no vae/config\.json: not a complete Diffusers pipeline folder"):
        check_resolution(config)


def test_resolution_is_read_from_the_component_configs(tiny_sd_path):
    from stepdistill.preflight import check_resolution

    config = type("C", (), {"pretrained_model_name_or_path": str(tiny_sd_path), "revision": None, "resolution": None})
    assert check_resolution(config) == 16
