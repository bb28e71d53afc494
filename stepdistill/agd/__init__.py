"""Adapter guidance distillation (AGD): adapters that give a UNet classifier-free guidance in one forward pass.

    pipe = stepdistill.load(pipe, "runs/agd")       # adapters hooked on, one UNet evaluation per step
    image = pipe("a prompt", guidance_scale=5.0).images[0]
    stepdistill.agd.disable(pipe)                    # the base pipeline again (real CFG), bit for bit
"""


def disable(pipe):
    """Remove AGD adapters that ``stepdistill.load`` put on ``pipe``; it is the base pipeline again."""
    adapters = getattr(pipe, "agd_adapters", None)
    if adapters is not None:
        adapters.detach()
        pipe.agd_adapters = None
    return pipe
