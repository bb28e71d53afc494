"""MSD's partition of the conditioning space and its router — one function for both: ``Router.route(prompts)``
decides which student trains on a prompt and which student samples it (MSD paper section 3.2: K disjoint, balanced,
semantically close parts; unbalanced k-means is rejected there).

Three partitioners build a router:
- ``balanced_kmeans``: k-means on pooled text embeddings with equal-size parts (a balanced assignment each round);
  the training prompts keep their balanced part, any other prompt goes to the nearest centroid — also one far from
  every part (there is always a nearest one).
- ``explicit``: patterns (regular expressions, first match wins) → student; a prompt no pattern matches is an error.
- ``class_blocks``: class labels 0..C-1 in K contiguous blocks of (almost) equal size.

A router saves itself as ``router.json`` (kind, parts, patterns) plus ``router.safetensors`` (centroids) and loads
back to the same function.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import StepdistillError

ROUTER_JSON, ROUTER_TENSORS = "router.json", "router.safetensors"


@dataclass
class Router:
    kind: str  # "kmeans" | "explicit" | "class_blocks"
    num_students: int
    assignments: dict[str, int] = field(default_factory=dict)  # known prompts (or classes, as str) -> part
    patterns: list[tuple[str, int]] = field(default_factory=list)  # explicit: (regex, part), first match wins
    centroids: torch.Tensor | None = None  # kmeans: (K, D), unit-normalised

    def route(self, prompts: Sequence[str], embeddings: torch.Tensor | None = None) -> list[int]:
        """The student of each prompt: a known prompt's own part, else (k-means) the nearest centroid by cosine
        similarity of its pooled text embedding, else (explicit) the first matching pattern."""
        parts: list[int | None] = [self.assignments.get(p) for p in prompts]
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing and self.kind == "kmeans":
            if embeddings is None:
                raise StepdistillError("this router needs the prompts' pooled text embeddings for prompts it has "
                                       "not seen in training (route(prompts, embeddings))")
            nearest = nearest_centroid(embeddings[missing], self.centroids)
            for i, part in zip(missing, nearest):
                parts[i] = part
        elif missing and self.kind == "explicit":
            for i in missing:
                parts[i] = self._match(prompts[i])
        elif missing:
            raise StepdistillError(f"class labels {[prompts[i] for i in missing][:5]} are outside this router's "
                                   f"classes 0..{len(self.assignments) - 1}")
        return [int(p) for p in parts]

    def _match(self, prompt: str) -> int:
        for pattern, part in self.patterns:
            if re.search(pattern, prompt):
                return part
        raise StepdistillError(f"prompt {prompt!r} matches none of the explicit partition's patterns "
                               f"{[p for p, _ in self.patterns]}; add a pattern that covers it")

    def save(self, directory: str | Path) -> None:
        """``router.json`` (+ ``router.safetensors``), each written to a temporary name and renamed: another process
        of the same launch never reads half a router."""
        import os

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.centroids is not None:
            tmp = directory / f".{ROUTER_TENSORS}.{os.getpid()}"
            save_file({"centroids": self.centroids.contiguous()}, str(tmp))
            os.replace(tmp, directory / ROUTER_TENSORS)
        tmp = directory / f".{ROUTER_JSON}.{os.getpid()}"
        tmp.write_text(json.dumps({
            "kind": self.kind, "num_students": self.num_students, "assignments": self.assignments,
            "patterns": [list(p) for p in self.patterns]}, indent=1) + "\n")
        os.replace(tmp, directory / ROUTER_JSON)  # last: a router.json on disk has its tensors beside it

    @classmethod
    def load(cls, directory: str | Path) -> "Router":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / ROUTER_JSON).is_file():
            raise StepdistillError(f"{directory}: no {ROUTER_JSON}; not an MSD output")
        raw = json.loads((directory / ROUTER_JSON).read_text())
        centroids = None
        if raw["kind"] == "kmeans":
            if not (directory / ROUTER_TENSORS).is_file():
                raise StepdistillError(f"{directory}: a k-means router without {ROUTER_TENSORS}")
            centroids = load_file(str(directory / ROUTER_TENSORS))["centroids"]
        return cls(raw["kind"], int(raw["num_students"]), {k: int(v) for k, v in raw["assignments"].items()},
                   [(p, int(k)) for p, k in raw["patterns"]], centroids)


def nearest_centroid(embeddings: torch.Tensor, centroids: torch.Tensor) -> list[int]:
    x = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return (x @ centroids.float().T).argmax(-1).tolist()


def _check_k(num_students: int, distinct: int, what: str) -> None:
    if num_students < 1:
        raise StepdistillError(f"--num_students {num_students}: must be at least 1")
    if num_students > distinct:
        raise StepdistillError(f"--num_students {num_students} is larger than the number of distinct {what} "
                               f"({distinct}): every student needs a part of its own")


def balanced_kmeans(prompts: Sequence[str], embeddings: torch.Tensor, num_students: int, iterations: int = 50,
                    seed: int = 0, exact_limit: int = 2000) -> Router:
    """K equal-size parts (sizes differ by at most one) of the prompts' pooled text embeddings (cosine geometry).
    Each round assigns prompts to centroids under the size cap — exactly (scipy's linear_sum_assignment over one
    slot per place in a part) up to ``exact_limit`` prompts, greedily by similarity beyond — then moves each
    centroid to its part's mean."""

    first = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)  # each distinct prompt once, with its first embedding
    prompts = list(first)
    _check_k(num_students, len(prompts), "prompts")
    x = torch.nn.functional.normalize(embeddings[list(first.values())].double(), dim=-1).numpy()
    n, k = len(prompts), num_students
    sizes = [n // k + (i < n % k) for i in range(k)]
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(n, size=k, replace=False)]
    parts = np.zeros(n, dtype=int)
    for _ in range(iterations):
        new = _capped_assignment(x @ centroids.T, sizes, exact=n <= exact_limit)
        moved = not np.array_equal(new, parts)
        parts = new
        centroids = np.stack([x[parts == c].mean(0) for c in range(k)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        if not moved:
            break
    return Router("kmeans", k, {p: int(c) for p, c in zip(prompts, parts)},
                  centroids=torch.from_numpy(centroids).float())


def _capped_assignment(similarity: np.ndarray, sizes: list[int], exact: bool) -> np.ndarray:
    """Each row to a column, column c taking exactly sizes[c] rows, maximising the total similarity (exact) or
    greedily, best pairs first."""
    n, k = similarity.shape
    if exact:
        from scipy.optimize import linear_sum_assignment

        slots = np.repeat(np.arange(k), sizes)  # one column per place in a part
        rows, cols = linear_sum_assignment(-similarity[:, slots])
        parts = np.empty(n, dtype=int)
        parts[rows] = slots[cols]
        return parts
    parts, left = np.full(n, -1), np.array(sizes)
    for flat in np.argsort(-similarity, axis=None):
        i, c = divmod(int(flat), k)
        if parts[i] < 0 and left[c] > 0:
            parts[i], left[c] = c, left[c] - 1
    return parts


def explicit(patterns: Sequence[tuple[str, int]], num_students: int, prompts: Sequence[str] = ()) -> Router:
    """Patterns → students; every student must own a pattern, and every given training prompt must match one."""
    for pattern, _ in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise StepdistillError(f"partition pattern {pattern!r} is not a regular expression ({e})") from e
    owned = {part for _, part in patterns}
    if owned != set(range(num_students)):
        raise StepdistillError(f"the explicit partition gives patterns to students {sorted(owned)}; each of "
                               f"0..{num_students - 1} needs at least one")
    router = Router("explicit", num_students, patterns=[(p, int(k)) for p, k in patterns])
    router.assignments = {p: router._match(p) for p in dict.fromkeys(prompts)}
    return router


def class_blocks(num_classes: int, num_students: int) -> Router:
    """Classes 0..C-1 in K contiguous blocks whose sizes differ by at most one."""
    _check_k(num_students, num_classes, "classes")
    sizes = [num_classes // num_students + (i < num_classes % num_students) for i in range(num_students)]
    parts = np.repeat(np.arange(num_students), sizes)
    return Router("class_blocks", num_students, {str(c): int(parts[c]) for c in range(num_classes)})


def pooled_text_embeddings(pipe, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """The text encoder's pooled output per prompt (SDXL: the second encoder's projected one), as MSD partitions
    prompts."""
    encoder = getattr(pipe, "text_encoder_2", None) or pipe.text_encoder
    tokenizer = getattr(pipe, "tokenizer_2", None) or pipe.tokenizer
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            ids = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            result = encoder(ids.to(encoder.device))
            pooled = getattr(result, "text_embeds", None)
            out.append((pooled if pooled is not None else result.pooler_output).float().cpu())
    return torch.cat(out)
