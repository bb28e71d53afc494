"""AGD's guidance adapters (Jensen et al. 2025, "Efficient Distillation of Classifier-Free Guidance using Adapters";
official code cristianpjensen/agd, agd/models/attention.py and agd/sd/adapter.py).

Beside every cross-attention ``attn2`` of the frozen UNet: out = attn2(h) + A(h), where A is a one-head
cross-attention whose queries come from h and whose keys/values are tokens built from the guidance scale w (random
Fourier features → MLP → LayerNorm), the timestep embedding (the frozen UNet's own embedder, projected) and the
prompt tokens (projected), plus a fixed sinusoidal position encoding. The output projection starts at zero, so
untrained adapters are exactly the conditional model.

The adapters attach through forward hooks, so the UNet's module paths (and the LoRA keys of the same base) do not
change. Two ways to feed w:
- training calls ``AGDAdapters(sample, t, w, **unet_kwargs)``, which runs the UNet with the adapters given w;
- a stock pipeline (``enable_pipeline_mode``): the UNet's config gets ``time_cond_proj_dim``, so the stock SD/SDXL
  pipelines skip CFG (one UNet evaluation per step) and pass an embedding of w - 1 as ``timestep_cond`` (the LCM
  mechanism); the UNet hook reads w back from its lowest-frequency pair and removes it before the UNet sees it.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import StepdistillError

GUIDANCE_EMBEDDING_DIM = 256  # the width of the stock pipelines' guidance embedding in pipeline mode


class ScalarEncoder(nn.Module):
    """g(w) = LayerNorm(MLP(cos(2π(f·w + φ)))) with fixed random f ~ N(0, 1), φ ~ U(0, 1) (kept in the state
    dict), MLP d → 4d → d with ReLU (official ScalarEncoder / FourierEncoding)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(dim))
        self.register_buffer("phases", torch.rand(dim))
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(2))
            nn.init.zeros_(layer.bias)
        self.norm = nn.LayerNorm(dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        features = torch.cos(2 * math.pi * (self.frequencies * w.float().unsqueeze(-1) + self.phases))
        return self.norm(self.mlp(features))


@functools.lru_cache(maxsize=16)
def _position_encoding(length: int, dim: int, max_period: float) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(-math.log(max_period) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return torch.cat([torch.sin(position * div), torch.cos(position * div)], dim=-1)


def position_encoding(length: int, dim: int, device, max_period: float = 10000.0) -> torch.Tensor:
    """The fixed sinusoidal encoding added to the context tokens (official PositionalEncoding); computed once per
    (length, width), not in every adapter call."""
    return _position_encoding(length, dim, max_period).to(device)


class GuidanceAdapter(nn.Module):
    """A(h) for one cross-attention: q = W_q h, k/v = W_k/W_v ([g(w); P_t t_emb; P_p prompt] + pe), one head,
    scale 1/√d, out = W_o attention (zero-initialised)."""

    def __init__(self, query_dim: int, hidden_dim: int, time_dim: int, prompt_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.q_proj = nn.Linear(query_dim, hidden_dim, bias=False)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.out_proj = nn.Linear(hidden_dim, query_dim)
        for layer in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self.guidance = ScalarEncoder(hidden_dim, mlp_ratio)
        self.time_proj = nn.Linear(time_dim, hidden_dim)
        self.prompt_proj = nn.Linear(prompt_dim, hidden_dim)

    def forward(self, h: torch.Tensor, w: torch.Tensor, t_emb: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        dtype = self.q_proj.weight.dtype
        tokens = torch.cat([self.guidance(w).unsqueeze(1).to(dtype), self.time_proj(t_emb.to(dtype)).unsqueeze(1),
                            self.prompt_proj(prompt.to(dtype))], dim=1)
        tokens = tokens + position_encoding(tokens.shape[1], self.hidden_dim, tokens.device).to(dtype)
        q, k, v = self.q_proj(h.to(dtype)), self.k_proj(tokens), self.v_proj(tokens)
        att = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                             scale=1.0 / math.sqrt(self.hidden_dim)).squeeze(1)
        return self.out_proj(att).to(h.dtype)


def cross_attention_paths(unet) -> list[str]:
    """Every cross-attention of the UNet. (The official module list takes ``layers_per_block`` attentions per up
    block, but up blocks hold ``layers_per_block + 1``: it leaves the last attention of each up block without an
    adapter. We adapt all of them.)"""
    return [name for name, _ in unet.named_modules() if name.endswith(".attn2")]


def adapter_layout(unet) -> dict:
    """What adapters depend on: the cross-attentions' paths and widths, the time-embedding and prompt widths."""
    return {"attn2": {p: int(unet.get_submodule(p).to_q.in_features) for p in cross_attention_paths(unet)},
            "time_dim": int(unet.time_embedding.linear_2.out_features),
            "prompt_dim": int(unet.get_submodule(cross_attention_paths(unet)[0]).to_k.in_features)}


def decode_guidance(timestep_cond: torch.Tensor) -> torch.Tensor:
    """w from the stock pipelines' ``get_guidance_scale_embedding(w - 1, 256)``: its last sin/cos pair has
    frequency 1e-4 on (w - 1)·1000, i.e. the angle 0.1 (w - 1), read back exactly (to ~1e-6) for w < 32."""
    half = timestep_cond.shape[-1] // 2
    freq = math.exp(-math.log(10000.0))  # = exp(-(half - 1) · log(10000) / (half - 1))
    angle = torch.atan2(timestep_cond[:, half - 1].double(), timestep_cond[:, 2 * half - 1].double())
    return (1 + angle / (freq * 1000.0)).float()


class AGDAdapters(nn.Module):
    """All adapters of one UNet. The UNet is held by reference, not as a submodule: only the adapters train,
    checkpoint and (under DDP) synchronise."""

    def __init__(self, unet, hidden_dim: int = 320, mlp_ratio: float = 4.0,
                 guidance_range: tuple[float, float] | None = None):
        super().__init__()
        sig = adapter_layout(unet)
        if not sig["attn2"]:
            raise StepdistillError(f"{type(unet).__name__} has no cross-attention (attn2): AGD needs a text UNet")
        self.signature, self.hidden_dim, self.mlp_ratio = sig, hidden_dim, mlp_ratio
        self.guidance_range = tuple(guidance_range) if guidance_range else None
        self.adapters = nn.ModuleDict({
            path.replace(".", "__"): GuidanceAdapter(dim, hidden_dim, sig["time_dim"], sig["prompt_dim"], mlp_ratio)
            for path, dim in sig["attn2"].items()})
        self._unet = [unet]
        self._handles: list = []
        self._w: torch.Tensor | None = None
        self._context: dict | None = None
        self._warned: set[float] = set()

    @property
    def unet(self):
        return self._unet[0]

    def state_dict_by_path(self) -> dict[str, torch.Tensor]:
        """Weights keyed by the UNet module path they adapt (``down_blocks.1....attn2.q_proj.weight``)."""
        return {k.replace("__", "."): v.detach().cpu().contiguous() for k, v in self.adapters.state_dict().items()}

    def load_state_dict_by_path(self, state: dict[str, torch.Tensor]) -> None:
        def key(name: str) -> str:  # "<path>.attn2.<param>" -> "<path with __>__attn2.<param>"
            path, rest = name.split(".attn2.", 1)
            return f"{path}.attn2".replace(".", "__") + "." + rest

        self.adapters.load_state_dict({key(k): v for k, v in state.items()})

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "AGDAdapters":
        if self._handles:
            return self
        unet = self.unet
        self._handles.append(unet.register_forward_pre_hook(self._before_unet, with_kwargs=True))
        self._handles.append(unet.register_forward_hook(self._after_unet))
        for key, adapter in self.adapters.items():
            attn = unet.get_submodule(key.replace("__", "."))
            self._handles.append(attn.register_forward_hook(self._hook_for(adapter), with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove every hook and leave pipeline mode: the UNet is the base model again, bit for bit."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.disable_pipeline_mode()

    def enable_pipeline_mode(self) -> None:
        """Stock pipelines then run one UNet evaluation per step and hand w to the adapters (module docstring)."""
        self.attach()
        self.unet.register_to_config(time_cond_proj_dim=GUIDANCE_EMBEDDING_DIM)

    def disable_pipeline_mode(self) -> None:
        if getattr(self.unet.config, "time_cond_proj_dim", None) == GUIDANCE_EMBEDDING_DIM and \
                getattr(self.unet.time_embedding, "cond_proj", None) is None:
            self.unet.register_to_config(time_cond_proj_dim=None)

    def _before_unet(self, unet, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        w = self._w
        if kwargs.get("timestep_cond") is not None and getattr(unet.time_embedding, "cond_proj", None) is None:
            w = decode_guidance(kwargs.pop("timestep_cond"))
            self._warn_outside_range(w)
        if w is None:
            raise StepdistillError("the AGD adapters got no guidance scale: call them with w, or enable pipeline mode "
                                   "(stepdistill.load does) and pass guidance_scale to the pipeline")
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        t_emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t))
        self._context = {"w": torch.as_tensor(w, device=sample.device, dtype=torch.float32).reshape(-1).expand(b),
                         "t_emb": t_emb, "prompt": kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)}
        return args, kwargs

    def _after_unet(self, unet, args, output):
        self._context = None

    def _hook_for(self, adapter: GuidanceAdapter):
        def hook(module, args, kwargs, output):
            ctx = self._context
            if ctx is None:
                return output
            h = args[0] if args else kwargs["hidden_states"]
            return output + adapter(h, ctx["w"], ctx["t_emb"], ctx["prompt"])
        return hook

    def _warn_outside_range(self, w: torch.Tensor) -> None:
        if self.guidance_range is None:
            return
        lo, hi = self.guidance_range
        for value in {round(float(v), 4) for v in w}:
            if not lo - 1e-3 <= value <= hi + 1e-3 and value not in self._warned:
                self._warned.add(value)
                warnings.warn(f"guidance_scale {value:g} is outside the range the AGD adapters were trained on "
                              f"[{lo:g}, {hi:g}]; expect CFG to be matched less well", stacklevel=2)

    # ------------------------------------------------------------------ training call
    def forward(self, sample, timestep, guidance_scale, **unet_kwargs):
        """The UNet's raw output with the adapters given ``guidance_scale`` (per sample)."""
        self.attach()
        self._w = guidance_scale
        try:
            return self.unet(sample, timestep, return_dict=False, **unet_kwargs)[0]
        finally:
            self._w = None


def parameter_share(adapters: AGDAdapters) -> tuple[int, int]:
    """(adapter parameters, UNet parameters)."""
    return (sum(p.numel() for p in adapters.parameters()),
            sum(p.numel() for p in adapters.unet.parameters()))
