"""The distribution-matching family as options of one trainer (--generator_loss dmd | diff_instruct | sid | sim |
fdistill | uni_instruct): each loss's gradient with respect to the generator's sample x_g, by autograd through
score networks that are linear maps of x_t = a x_g + s ε (and a linear discriminator), equals its formula worked
out by hand; the members that should coincide do; and each new member trains two steps on tiny SD and tiny SDXL."""

import pytest
import torch
from conftest import dm_args, read_logs
from safetensors.torch import load_file

from stepdistill.config import parse_config
from stepdistill.errors import StepdistillError
from stepdistill.methods.dmd2 import DMD2, DMD2Config
from stepdistill.methods.losses import (F_DI_WEIGHTS, F_WEIGHTS, DiffInstructLoss, DMDLoss, FDistillLoss,
                                        ScorePair, SiDLoss, SIMLoss, UniInstructLoss, density_ratio)
from stepdistill.methods.sid import SiD, SiDConfig
from stepdistill.trainer import run

B, SHAPE = 3, (2, 2, 2)
D = 8


class Point:
    """x_g (leaf), x_t = a x_g + s ε per sample, y_r = M_r x_t + c_r, y_f = M_f x_t + c_f and logit = w·x_t +
    β, so that every loss's gradient in x_g can be written down with the Jacobians a M_r, a M_f, a w."""

    def __init__(self, seed=0, logit_scale=0.3):
        g = torch.Generator().manual_seed(seed)
        self.x_g = torch.randn(B, *SHAPE, generator=g)
        self.noise = torch.randn(B, *SHAPE, generator=g)
        self.a = torch.rand(B, generator=g) * 0.8 + 0.1
        self.s = (1 - self.a ** 2).sqrt()
        eye = torch.eye(D)
        self.M_r = eye + 0.3 * torch.randn(D, D, generator=g)
        self.M_f = eye + 0.3 * torch.randn(D, D, generator=g)
        self.c_r, self.c_f = torch.randn(D, generator=g), torch.randn(D, generator=g)
        self.w = logit_scale * torch.randn(D, generator=g)
        self.beta = 0.2

    def pair(self, input_grad: bool):
        x_g = self.x_g.clone().requires_grad_(True)
        x_t = self.a.view(B, 1, 1, 1) * x_g + self.s.view(B, 1, 1, 1) * self.noise
        flat = x_t.flatten(1)
        with torch.set_grad_enabled(input_grad):
            y_r = (flat @ self.M_r.T + self.c_r).view_as(x_g)
            y_f = (flat @ self.M_f.T + self.c_f).view_as(x_g)
            logits = flat @ self.w + self.beta
        return x_g, ScorePair(x_g, x_t, torch.zeros(B), self.noise, y_r, y_f, logits)

    def grad(self, loss_fn, input_grad):
        x_g, pair = self.pair(input_grad)
        loss, _ = loss_fn(pair)
        loss.backward()
        return x_g.grad.flatten(1), pair

    def values(self):
        """Per sample, detached and flat: x, y_r, y_f, δ = y_r - y_f, ω, logit."""
        _, p = self.pair(False)
        x, yr, yf = p.x_g.detach().flatten(1), p.y_real.flatten(1), p.y_fake.flatten(1)
        omega = (x - yr).abs().mean(1).clip(min=1e-5)
        return x, yr, yf, yr - yf, omega, p.logits


def _score_branch_by_hand(pt, A, B_):
    """∂/∂x_g of (1/b) Σ_i [½ A_i ‖δ_i‖² + B_i δ_i·(y_f,i - x_i)] / ω_i, ω, A and B constant."""
    x, yr, yf, d, omega, logits = pt.values()
    out = []
    for i in range(B):
        a = pt.a[i]
        J_d = a * (pt.M_r - pt.M_f)  # ∂δ/∂x_g
        J_f = a * pt.M_f  # ∂y_f/∂x_g
        g = A[i] * J_d.T @ d[i] + B_[i] * (J_d.T @ (yf[i] - x[i]) + (J_f - torch.eye(D)).T @ d[i])
        out.append(g / omega[i] / B)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------- fixed tensors
def test_dmd_and_diff_instruct_gradients_are_their_formulas():
    pt = Point()
    x, yr, yf, d, omega, _ = pt.values()
    numel = B * D
    grad, _ = pt.grad(DMDLoss(), False)
    assert torch.allclose(grad, (yf - yr) / (x - yr).abs().mean(1, keepdim=True) / numel, rtol=1e-5, atol=1e-7)
    grad, _ = pt.grad(DiffInstructLoss(), False)
    assert torch.allclose(grad, (yf - yr) / numel, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", list(F_WEIGHTS))
def test_fdistill_gradient_is_h_times_dmds(divergence):
    pt = Point()
    x, yr, yf, d, omega, logits = pt.values()
    r = logits.exp().clamp(0.1, 20)
    h = F_WEIGHTS[divergence](r)
    if divergence != "reverse_kl":
        h = h / (h.mean() + 1e-6)
    grad, _ = pt.grad(FDistillLoss(divergence), False)
    dmd = (yf - yr) / (x - yr).abs().mean(1, keepdim=True) / (B * D)
    assert torch.allclose(grad, h[:, None] * dmd, rtol=1e-5, atol=1e-7)


def test_fdistill_with_reverse_kl_is_dmd_exactly():
    pt = Point()
    assert torch.equal(pt.grad(FDistillLoss("reverse_kl"), False)[0], pt.grad(DMDLoss(), False)[0])
    _, pair = pt.pair(False)
    assert torch.equal(FDistillLoss("reverse_kl")(pair)[0], DMDLoss()(pair)[0])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_sid_gradient_runs_through_the_score_networks(alpha):
    pt = Point()
    x, yr, yf, d, omega, _ = pt.values()
    # Σ δ·((y_r - x) - α δ) = (1 - α)‖δ‖² + δ·(y_f - x): A = 2(1 - α), B = 1
    ones = torch.ones(B)
    by_hand = _score_branch_by_hand(pt, 2 * (1 - alpha) * ones, ones)
    grad, _ = pt.grad(SiDLoss(alpha), True)
    assert torch.allclose(grad, by_hand, rtol=1e-4, atol=1e-6)


def test_sim_gradients_are_their_formulas():
    pt = Point()
    ones, zeros = torch.ones(B), torch.zeros(B)
    # l2: d = ‖δ‖², ½ d'(δ)·(y_f - x) / ω = δ·(y_f - x) / ω
    assert torch.allclose(pt.grad(SIMLoss("l2"), True)[0], _score_branch_by_hand(pt, zeros, ones), rtol=1e-4,
                          atol=1e-6)
    # pseudo-Huber: ½ δ·(y_f - x) / (R ω), R = √(‖δ‖² + c²), the gradient through R as well (d' is not stopped)
    loss = SIMLoss("pseudo_huber", huber_c=0.5)
    c = 0.5 * D ** 0.5
    x, yr, yf, d, omega, _ = pt.values()
    by_hand = []
    for i in range(B):
        a = pt.a[i]
        J_d, J_f = a * (pt.M_r - pt.M_f), a * pt.M_f
        R = (d[i] @ d[i] + c ** 2).sqrt()
        dR = J_d.T @ d[i] / R
        cross = d[i] @ (yf[i] - x[i])
        d_cross = J_d.T @ (yf[i] - x[i]) + (J_f - torch.eye(D)).T @ d[i]
        by_hand.append(0.5 * (d_cross / R - cross / R ** 2 * dR) / omega[i] / B)
    assert torch.allclose(pt.grad(loss, True)[0], torch.stack(by_hand), rtol=1e-4, atol=1e-6)


def test_sim_l2_and_uni_instruct_reverse_kl_are_sid_at_alpha_one():
    """The official Uni-Instruct code's reverse-KL branch (a-little-hoof/Uni_Instruct fsim_training_loop.py,
    commented "# SiD") is its base loss (y_r - y_f)·(y_f - y)/ω: SiD at α = 1; SIM with d = ‖·‖² is the same.
    methods.md section 7's derivation (which keeps the gradient of the sampling distribution) gives α = 0.5
    instead: the test shows the two are different losses, and ours follows the code."""
    pt = Point()
    sid = pt.grad(SiDLoss(1.0), True)[0]
    assert torch.allclose(pt.grad(UniInstructLoss("reverse_kl"), True)[0], sid, rtol=1e-5, atol=1e-7)
    assert torch.allclose(pt.grad(SIMLoss("l2"), True)[0], sid, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(pt.grad(SiDLoss(0.5), True)[0], sid, rtol=1e-3)  # the derivation's α = 0.5 is not it


@pytest.mark.parametrize("divergence", list(F_WEIGHTS))
def test_uni_instruct_gradient_is_phi_sid_plus_psi_diff_instruct(divergence):
    """φ(r) δ·(y_f - x)/ω through both score networks, plus ψ(r)‖δ‖δ/ω on x directly, r = exp(logit) detached."""
    pt = Point()
    x, yr, yf, d, omega, logits = pt.values()
    r = logits.exp().clamp(0.1, 20)
    phi, psi = F_WEIGHTS[divergence](r), F_DI_WEIGHTS[divergence](r)
    norm = 1.0 if divergence == "reverse_kl" else phi.mean() + 1e-6
    di = (psi / norm)[:, None] * d.norm(dim=1, keepdim=True) * d / omega[:, None] / B
    by_hand = _score_branch_by_hand(pt, torch.zeros(B), phi / norm) + di
    grad, _ = pt.grad(UniInstructLoss(divergence), True)
    assert torch.allclose(grad, by_hand, rtol=1e-4, atol=1e-6)
    assert (psi != 0).any() == (divergence in ("js", "hellinger"))  # the DI branch is live where φ is not linear


# the f of D_f(p‖q) = E_q[f(p/q)] for each divergence, to check φ = r² f''(r) and φ - rφ' by autograd
F_OF_R = {
    "reverse_kl": lambda r: -r.log(),
    "forward_kl": lambda r: r * r.log(),
    "js": lambda r: 0.5 * (r * r.log() - (1 + r) * ((1 + r) / 2).log()),
    "hellinger": lambda r: (r.sqrt() - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * r.log(),
}


@pytest.mark.parametrize("divergence", list(F_WEIGHTS))
def test_weights_are_r_squared_f_second_derivative(divergence):
    r = torch.linspace(0.2, 15, 50, dtype=torch.float64, requires_grad=True)
    (df,) = torch.autograd.grad(F_OF_R[divergence](r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r, create_graph=True)
    phi = r ** 2 * d2f
    ratio = phi / F_WEIGHTS[divergence](r)
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))  # proportional: a constant factor (½ for js, hellinger)
    (dphi,) = torch.autograd.grad(phi.sum(), r, create_graph=True)
    (d2phi,) = torch.autograd.grad(dphi.sum(), r)
    psi = -(r ** 2) * d2phi / ratio[0]  # -r² φ'' with φ's constant
    assert torch.allclose(psi, F_DI_WEIGHTS[divergence](r.detach()))


def test_density_ratio_is_clamped_as_fastgen():
    logits = torch.tensor([-50.0, -3.0, 0.0, 2.0, 50.0])
    assert torch.allclose(density_ratio(logits), torch.tensor([0.1, 0.1, 1.0, 2.0 ** 0 * torch.e ** 2, 20.0]))


# ----------------------------------------------------------------------------------------------- options
def test_option_defaults_keep_each_methods_own_loss():
    assert parse_config(DMD2Config, ["--prompts_file", "p.txt"]).generator_loss == "dmd"
    assert parse_config(SiDConfig, ["--prompts_file", "p.txt"]).generator_loss == "sid"
    c = parse_config(DMD2Config, ["--prompts_file", "p.txt", "--generator_loss", "fdistill", "--train_data_dir", "d",
                                  "--gan", "true"])
    assert isinstance(c.make_generator_loss(), FDistillLoss) and c.make_generator_loss().divergence == "js"


@pytest.mark.parametrize("argv, message", [
    (["--generator_loss", "fdistill"], "pass --gan true"),
    (["--generator_loss", "uni_instruct"], "pass --gan true"),
    (["--generator_loss", "sid", "--divergence", "js"], "takes no divergence"),
    (["--generator_loss", "sid", "--sim_distance", "l2"], "only --generator_loss sim"),
])
def test_bad_family_options(argv, message):
    with pytest.raises(StepdistillError, match=message):
        parse_config(DMD2Config, ["--prompts_file", "p.txt", *argv]).validate()


# ----------------------------------------------------------------------------------------------- training
NEW = [("diff_instruct", {}), ("sim", {}), ("fdistill", {"divergence": "js"}),
       ("uni_instruct", {"divergence": "forward_kl"})]


def _train_and_check(model, method, loss, extra, digits_dir, prompts_file, out):
    gan = loss in ("fdistill", "uni_instruct")
    argv = dm_args(model, out, digits_dir if gan else None, prompts=prompts_file, generator_loss=loss,
                   learning_rate=1e-2, dfake_gen_update_ratio=1, train_batch_size=2, **extra,
                   **({"gan": "true"} if gan else {}))
    assert run(method, argv) == 0
    logs = read_logs(out)
    key = "loss_" + {"dmd": "dm"}.get(loss, loss)
    assert len(logs) == 2 and all(key in r and torch.isfinite(torch.tensor(r[key])) for r in logs)
    if gan:
        assert all(torch.isfinite(torch.tensor(r["ratio_mean"])) for r in logs)
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    moved = max(v.abs().max().item() for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    assert moved > 0  # every LoRA B starts at 0


@pytest.mark.parametrize("loss, extra", NEW + [("uni_instruct_sid", {"divergence": "js"})])
def test_new_members_train_on_tiny_sd(loss, extra, tiny_sd_path, digits_dir, prompts_file, tmp_path):
    method = SiD if loss.endswith("_sid") else DMD2
    _train_and_check(tiny_sd_path, method, loss.removesuffix("_sid"), extra, digits_dir, prompts_file,
                     tmp_path / "out")


@pytest.mark.parametrize("loss, extra", NEW)
def test_new_members_train_on_tiny_sdxl(loss, extra, tiny_sdxl_path, digits_dir, prompts_file, tmp_path):
    _train_and_check(tiny_sdxl_path, DMD2, loss, extra, digits_dir, prompts_file, tmp_path / "out")
