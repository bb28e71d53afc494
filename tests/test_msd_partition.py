"""MSD's partitioners and router: balanced parts, planted structure recovered, one function for training and
inference, save -> load, and the bad-input errors."""

import pytest
import torch

from stepdistill.errors import StepdistillError
from stepdistill.msd.partition import Router, balanced_kmeans, class_blocks, explicit, pooled_text_embeddings


def _planted(k=4, per=6, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 3
    x = torch.cat([centers[c] + 0.3 * torch.randn(per, dim, generator=g) for c in range(k)])
    prompts = [f"group {c} prompt {i}" for c in range(k) for i in range(per)]
    return prompts, x, [c for c in range(k) for _ in range(per)]


@pytest.mark.parametrize("exact_limit", [2000, 0])  # the exact assignment and the greedy one
def test_balanced_kmeans_recovers_planted_groups_in_equal_parts(exact_limit):
    prompts, x, truth = _planted()
    router = balanced_kmeans(prompts, x, 4, exact_limit=exact_limit)
    parts = router.route(prompts)
    assert sorted(parts.count(c) for c in range(4)) == [6, 6, 6, 6]
    # each planted group lands in one part, and different groups in different parts
    assert len({(t, p) for t, p in zip(truth, parts)}) == 4 and len(set(parts)) == 4


def test_parts_differ_by_at_most_one_and_unseen_prompts_go_to_the_nearest_centroid(tmp_path):
    prompts, x, truth = _planted(k=3, per=5)
    router = balanced_kmeans(prompts, x, 2)
    sizes = sorted(router.route(prompts).count(c) for c in range(2))
    assert sizes == [7, 8]
    # one function: training prompts keep their part; a new prompt near a training prompt goes where it went
    new = x[[0, 14]] + 0.01
    assert router.route(["new a", "new b"], new) == [router.route([prompts[0]])[0], router.route([prompts[14]])[0]]
    router.save(tmp_path)
    again = Router.load(tmp_path)
    assert again.route(prompts) == router.route(prompts) and again.route(["new a"], new[:1]) == router.route(["new a"], new[:1])
    with pytest.raises(StepdistillError, match="pooled text embeddings"):
        again.route(["never seen"])


def test_explicit_patterns_and_class_blocks(tmp_path):
    router = explicit([(r"\b(zero|one|two|0|1|2)\b", 0), (r".", 1)], 2, ["a digit one", "a digit seven"])
    assert router.route(["the number 2", "a digit seven", "a digit one"]) == [0, 1, 0]
    router.save(tmp_path)
    assert Router.load(tmp_path).route(["the number 2", "a photo of 9"]) == [0, 1]
    blocks = class_blocks(10, 4)
    assert blocks.route([str(c) for c in range(10)]) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("make, message", [
    (lambda: explicit([(r"seven", 0)], 2), "each of 0..1 needs at least one"),
    (lambda: explicit([(r"seven", 0), (r"eight", 1)], 2, ["a digit nine"]), "matches none of the explicit"),
    (lambda: explicit([(r"(", 0)], 1), "not a regular expression"),
    (lambda: class_blocks(3, 4), "larger than the number of distinct classes (3)"),
    (lambda: balanced_kmeans(["a", "b", "a"], torch.randn(3, 4), 3), "distinct prompts (2)"),
])
def test_bad_partitions_are_one_line_errors(make, message):
    with pytest.raises(StepdistillError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_pooled_text_embeddings_of_a_pipeline(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    e = pooled_text_embeddings(pipe, ["a digit", "the number one", "a digit"])
    assert e.shape[0] == 3 and torch.equal(e[0], e[2]) and not torch.equal(e[0], e[1])


def test_duplicate_prompts_count_once_with_their_own_embedding():
    prompts, x, truth = _planted(k=2, per=4)
    doubled = [prompts[0]] + prompts  # a repeat at the front shifts every later embedding by one
    router = balanced_kmeans(doubled, torch.cat([x[:1], x]), 2)
    assert router.route(prompts) == balanced_kmeans(prompts, x, 2).route(prompts)
