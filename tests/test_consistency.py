"""The consistency family's arithmetic against hand-computed values."""

import torch
from diffusers import DDIMScheduler

from stepdistill.methods.consistency import (boundary_scalings, guided_solver_step, lower_edge, segment_edges,
                                             skipping_grid)
from stepdistill.methods.losses import ConsistencyLoss, hinge_discriminator_loss, hinge_generator_loss
from stepdistill.teacher import Teacher


def test_skipping_grid():
    grid = skipping_grid(1000, 50)
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1] == 999 and len(grid) == 50
    assert skipping_grid(1000, 40)[:2].tolist() == [24, 49]


def test_boundary_scalings_by_hand():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    # σd = 0.5, t scaled by 10: c_skip = 0.25 / (190² + 0.25), c_out = 190 / sqrt(190² + 0.25)
    assert abs(c_skip[1].item() - 0.25 / (190 ** 2 + 0.25)) < 1e-10
    assert abs(c_out[1].item() - 190 / (190 ** 2 + 0.25) ** 0.5) < 1e-7
    assert c_skip[2] < 1e-6 and abs(c_out[2] - 1) < 1e-6


def test_segment_edges_are_trailing_ddim_timesteps():
    for k in (8, 4, 2, 1):
        sched = DDIMScheduler(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False)
        sched.set_timesteps(k)
        assert segment_edges(k)[:-1] == sched.timesteps.tolist()
        assert segment_edges(k)[-1] == 0
    assert segment_edges(4) == [999, 749, 499, 249, 0]


def test_lower_edge():
    t = torch.tensor([999, 774, 750, 749, 500, 499, 250, 249, 24])
    assert lower_edge(t, 4).tolist() == [749, 749, 749, 499, 499, 249, 249, 0, 0]
    assert lower_edge(t, 1).tolist() == [0] * 9


def test_guided_solver_step_by_hand(tiny_sd_path):
    teacher = Teacher.from_pretrained(str(tiny_sd_path))
    cond = teacher.encode_prompt(["a red cat", "a dog"])
    x = torch.randn(2, 4, 8, 8)
    t, t_prev = torch.tensor([999, 519]), torch.tensor([979, 499])
    with torch.no_grad():
        ours = guided_solver_step(teacher, teacher.unet, x, t, t_prev, cond, torch.tensor([3.0, 8.0]))
        eps_c = teacher.predict(x, t, cond)
        eps_u = teacher.predict(x, t, teacher.uncond(2))
    w = torch.tensor([3.0, 8.0]).view(-1, 1, 1, 1)
    eps = eps_u + w * (eps_c - eps_u)
    abar = teacher.alphas_cumprod.float()
    a_t, s_t = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    a_p, s_p = abar[t_prev].sqrt().view(-1, 1, 1, 1), (1 - abar[t_prev]).sqrt().view(-1, 1, 1, 1)
    expected = a_p * (x - s_t * eps) / a_t + s_p * eps
    assert torch.allclose(ours, expected, atol=1e-5)


def test_pseudo_huber_by_hand():
    pred, target = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0])
    c = 1e-3
    expected = ((0 + c * c) ** 0.5 - c + (1 + c * c) ** 0.5 - c) / 2
    assert abs(ConsistencyLoss("huber", c)(pred, target).item() - expected) < 1e-7
    assert ConsistencyLoss("l2")(pred, target).item() == 0.5


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1.5]
    assert hinge_discriminator_loss(real, fake).item() == 0.25 + 0.75
    assert hinge_generator_loss(fake).item() == 0.75
