"""Pieces the consistency family shares: the skipping-step grid, the teacher's guided DDIM solver step, LCM's
boundary-condition scalings, Hyper-SD's segment edges, and the losses."""

from __future__ import annotations

import torch

from ..teacher import Conditioning, Teacher


def skipping_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """grid[i] = (i + 1) k - 1 with k = T / N: 19, 39, ..., 999 for N = 50 (LCM, methods.md §1)."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's c_skip, c_out: f(x, t) = c_skip x + c_out x0 with f(x, 0) = x (consistency boundary condition)."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip.float(), c_out.float()


def segment_edges(num_segments: int, num_train_timesteps: int = 1000) -> list[int]:
    """Segment boundaries, high to low, equal to the trailing DDIM timesteps for ``num_segments`` steps plus the
    end point 0: k = 4 → [999, 749, 499, 249, 0] (DDIMScheduler(timestep_spacing='trailing') gives 999, 749, 499,
    249 and its last step lands on ᾱ_0 with set_alpha_to_one=False)."""
    step = num_train_timesteps / num_segments
    edges = [round(num_train_timesteps - j * step) - 1 for j in range(num_segments)]
    return edges + [0]


def lower_edge(t: torch.Tensor, num_segments: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The lower boundary of the segment holding each t: the largest edge strictly below t (0 for the last)."""
    edges = torch.tensor(segment_edges(num_segments, num_train_timesteps)[1:], device=t.device)  # descending
    below = edges.view(1, -1) < t.view(-1, 1)
    # the first edge (in descending order) below t is the largest one below t
    first = below.float().argmax(dim=1)
    return edges[first]


def guided_solver_step(teacher: Teacher, unet, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                       cond: Conditioning, guidance_scale, uncond: Conditioning | None = None) -> torch.Tensor:
    """One deterministic DDIM step of the CFG-guided teacher from t to t_prev (cond and uncond in one call)."""
    pred = teacher.guided_predict(x, t, cond, guidance_scale, uncond=uncond, unet=unet)
    return teacher.ddim_step(pred, x, t, t_prev)


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "huber",
                     huber_c: float = 1e-3) -> torch.Tensor:
    """Pseudo-Huber sqrt((f - target)² + c²) - c (LCM, iCT) or mean squared error."""
    if loss_type == "huber":
        return (torch.sqrt((pred.float() - target.float()) ** 2 + huber_c ** 2) - huber_c).mean()
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    raise ValueError(f"unknown loss_type {loss_type!r}")
