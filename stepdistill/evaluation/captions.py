"""The prompts an evaluation samples: a prompt file, COCO-style captions, or the default prompts of a chosen
metric's world."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from ..errors import StepdistillError
from ..prompts import read_prompts
from .registry import metrics


def _clean_text(text: str) -> str:
    return " ".join(str(text).split())


def read_captions(path: str | Path) -> list[str]:
    """The first caption of each image, in file order, from COCO-style JSON or a CSV with image_id/caption."""
    path = Path(path)
    hint = ("pass COCO-style JSON {\"annotations\": [{\"image_id\": .., \"caption\": ..}]} or a CSV with image_id "
            "and caption columns")
    if not path.is_file():
        raise StepdistillError(f"{path}: captions file not found; {hint}")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
            rows = raw.get("annotations") if isinstance(raw, dict) else raw
            if not isinstance(rows, list) or not all(isinstance(r, dict) and {"image_id", "caption"} <= r.keys()
                                                     for r in rows):
                raise StepdistillError(f"{path}: no list of annotations with image_id and caption; {hint}")
        else:
            with open(path, newline="") as f:
                reader = csv.DictReader(f, dialect=csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel)
                columns = reader.fieldnames or []
                if not {"image_id", "caption"} <= set(columns):
                    raise StepdistillError(f"{path}: CSV columns are {columns}, expected image_id and caption")
                rows = list(reader)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise StepdistillError(f"{path}: cannot parse captions ({e}); {hint}") from e
    first: dict[str, str] = {}
    for r in rows:
        # COCO has five captions per image; the 30k protocol samples one image per caption set
        first.setdefault(str(r["image_id"]), _clean_text(r["caption"]))
    captions = [c for c in first.values() if c]
    if not captions:
        raise StepdistillError(f"{path}: no captions found; {hint}")
    return captions


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
        raise StepdistillError("no prompts: pass --prompts_file (one per line) or --captions_file (COCO JSON/CSV)")
    info = {"kind": kind, "source": source, "num_distinct": len(set(prompts)),
            "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    return prompts, info
