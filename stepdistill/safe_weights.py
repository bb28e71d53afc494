"""Weights are read from safetensors only: a pickle file (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.ckpt``) can run
code when loaded, so base models, students, VAEs and adapters in pickle form are refused unless ``--allow_pickle``
says the user trusts them. Local folders are checked before anything loads (a one-line error naming the file); a
hub id's weights are fetched with ``use_safetensors=True``, which refuses pickle-only repositories the same way."""

from __future__ import annotations

from pathlib import Path

from .errors import StepdistillError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def load_kwargs(allow_pickle: bool) -> dict:
    """``from_pretrained`` arguments: safetensors only, unless pickles are allowed (then Diffusers' default)."""
    return {} if allow_pickle else {"use_safetensors": True}


def _weight_folders(root: Path) -> list[Path]:
    """The folders of a model or pipeline that hold weights: the folder itself and its direct subfolders."""
    return [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_no_pickle(path: str | Path, allow_pickle: bool, what: str = "--pretrained_model_name_or_path") -> None:
    """A local model or pipeline folder whose weights exist only as pickles is an error (before loading), naming
    the file and the two ways out; a folder with safetensors beside pickles loads the safetensors. Hub ids and
    missing paths are left to the loader."""
    root = Path(path)
    if allow_pickle or not root.is_dir():
        return
    for folder in _weight_folders(root):
        files = [f for f in folder.iterdir() if f.is_file()]
        pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
        if pickles and not any(f.suffix == ".safetensors" for f in files):
            raise StepdistillError(
                f"{what} {path}: {pickles[0].relative_to(root) if pickles[0] != root else pickles[0].name} is a pickle "
                "file, which can run code when loaded; convert it to safetensors (save_pretrained(..., "
                "safe_serialization=True)) or pass --allow_pickle if you trust it")


def refuse_pickle_file(path: str | Path, allow_pickle: bool, what: str) -> None:
    """A single weights file given by the user must be safetensors unless pickles are allowed."""
    if not allow_pickle and Path(path).suffix in PICKLE_SUFFIXES:
        raise StepdistillError(f"{what} {path}: a pickle file, which can run code when loaded; convert it to "
                               "safetensors or pass --allow_pickle if you trust it")
