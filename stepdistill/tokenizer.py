"""A CLIP tokenizer built from a word list, with no download.

CLIP's BPE splits a word into byte-level characters (the last one carrying ``</w>``) and merges pairs by rank.
We write a vocabulary that holds every single character (with and without ``</w>``) and, for each word, the merges
that grow it left to right, so every listed word becomes one token and any other text still tokenizes (into
characters) instead of hitting the unknown token.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_ALPHABET = string.ascii_lowercase + string.digits + ".,'!?-"


def write_clip_tokenizer(directory: str | Path, words: list[str], model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` to ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for ch in _ALPHABET:
        add(ch)
        add(ch + "</w>")
    merges: list[str] = []
    seen_merges: set[str] = set()
    for word in sorted({w.lower() for w in words}):
        bad = set(word) - set(_ALPHABET)
        if bad:
            raise ValueError(f"word {word!r} has characters {sorted(bad)} outside the tokenizer alphabet")
        if len(word) == 1:
            continue
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merge = f"{prefix} {right}"
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            prefix = prefix + right
            add(prefix)
    add(BOS)
    add(EOS)
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory
