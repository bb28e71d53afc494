"""The prompts an evaluation samples: a prompt file, COCO-style captions, or the default prompts of a chosen
metric's world."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

from ..errors import StepdistillError
from ..prompts import read_prompts
from .registry import metrics


def _clean_text(text: str) -> str:
    return " ".join(str(text).split())


HINT = ("pass a caption list (.txt, one caption a line, as GigaGAN's 30k list), COCO-style JSON {\"annotations\": "
        "[{\"image_id\": .., \"caption\": ..}]} or a CSV with image_id and caption columns")


def _caption_rows(path: Path) -> list[tuple[str | None, str]]:
    """``(image_id, caption)`` per caption, in file order; ``image_id`` is ``None`` in a ``.txt`` list."""
    if not path.is_file():
        raise StepdistillError(f"{path}: captions file not found; {HINT}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            # every line is one caption, kept verbatim (GigaGAN's evaluation reads its list with splitlines() and
            # DMD2/SiD-LSG feed those strings to the generator and to CLIP as they are)
            lines = path.read_text(encoding="utf-8").splitlines()
            blank = next((i for i, line in enumerate(lines, 1) if not line.strip()), None)
            if blank is not None:
                raise StepdistillError(f"{path}: line {blank} is blank; a caption list has one caption on every "
                                       "line (image i takes line i)")
            return [(None, line) for line in lines]
        if suffix == ".json":
            raw = json.loads(path.read_text())
            rows = raw.get("annotations") if isinstance(raw, dict) else raw
            if not isinstance(rows, list) or not all(isinstance(r, dict) and {"image_id", "caption"} <= r.keys()
                                                     for r in rows):
                raise StepdistillError(f"{path}: no list of annotations with image_id and caption; {HINT}")
        else:
            with open(path, newline="") as f:
                reader = csv.DictReader(f, dialect=csv.excel_tab if suffix == ".tsv" else csv.excel)
                columns = reader.fieldnames or []
                if not {"image_id", "caption"} <= set(columns):
                    raise StepdistillError(f"{path}: CSV columns are {columns}, expected image_id and caption")
                rows = list(reader)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise StepdistillError(f"{path}: cannot parse captions ({e}); {HINT}") from e
    first: dict[str, str] = {}
    for r in rows:
        # COCO has five captions per image; the 30k protocol samples one image per caption set
        first.setdefault(str(r["image_id"]).strip(), _clean_text(r["caption"]))
    return [(image_id, caption) for image_id, caption in first.items() if caption]


def read_captions(path: str | Path) -> list[str]:
    """The captions of a ``.txt`` caption list (every line, verbatim), or the first caption of each image, in file
    order, from COCO-style JSON or a CSV with image_id/caption."""
    path = Path(path)
    captions = [caption for _, caption in _caption_rows(path)]
    if not captions:
        raise StepdistillError(f"{path}: no captions found; {HINT}")
    return captions


def caption_image_ids(path: str | Path) -> list[str] | None:
    """The image id of each caption :func:`read_captions` returns, or ``None`` for a ``.txt`` list (no ids)."""
    rows = _caption_rows(Path(path))
    return None if rows and rows[0][0] is None else [image_id for image_id, _ in rows]


def _file_image_id(path: Path) -> str | None:
    # COCO_val2014_000000391895.jpg and 391895.png both name image 391895
    digits = re.search(r"(\d+)$", path.stem)
    return str(int(digits.group(1))) if digits else None


def select_images_by_id(paths: list[Path], ids: list[str], name: str) -> list[Path]:
    """The files among ``paths`` of the listed image ids, in list order: a file's id is the number its name ends
    with (``COCO_val2014_000000391895.jpg`` is 391895). Every id must name exactly one file."""
    by_id: dict[str, Path] = {}
    for p in paths:
        image_id = _file_image_id(p)
        if image_id is None:
            continue
        if image_id in by_id:
            raise StepdistillError(f"{name}: {by_id[image_id].name} and {p.name} both name image {image_id}")
        by_id[image_id] = p
    wanted = []
    for image_id in ids:
        key = str(int(image_id)) if str(image_id).isdigit() else str(image_id)
        wanted.append(key)
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise StepdistillError(f"{name}: {len(missing)} of the {len(wanted)} listed images are not in the folder "
                               f"(first: image_id {missing[0]}); pass the folder the list was drawn from (e.g. "
                               "val2014/)")
    return [by_id[i] for i in wanted]


def prompt_source(args) -> tuple[list[str], dict]:
    """The prompts of ``--prompts_file`` or ``--captions_file``, else the default prompts of the first chosen
    metric that has some, and what the protocol records about them."""
    if args.prompts_file and args.captions_file:
        raise StepdistillError("pass either --prompts_file or --captions_file, not both")
    defaults = [spec.default_prompts for name, spec in metrics().items()
                if name in args.metrics and spec.default_prompts is not None]
    if args.prompts_file:
        prompts, kind, source = read_prompts(args.prompts_file), "prompts_file", str(args.prompts_file)
    elif args.captions_file:
        prompts, kind, source = read_captions(args.captions_file), "captions_file", str(args.captions_file)
    elif defaults:
        (prompts, source), kind = defaults[0](), "builtin"
    else:
        raise StepdistillError("no prompts: pass --prompts_file (one per line) or --captions_file (a .txt caption "
                               "list, COCO JSON or CSV)")
    info = {"kind": kind, "source": source, "num_distinct": len(set(prompts)),
            "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    return prompts, info
