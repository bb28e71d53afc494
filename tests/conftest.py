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
