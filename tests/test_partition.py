"""Layer plans: which rank holds which blocks."""
from __future__ import annotations

import itertools

import pytest

from nanopipe.partition import (
    PartitionError,
    balanced,
    block_params,
    even,
    format_plan,
    from_mapping,
    group_of,
    groups,
    head_cost_blocks,
    plan,
    stage_bytes,
)


def counts(ranges):
    return [hi - lo for lo, hi in ranges]


def assert_covers_once(ranges, n_layer, n_nodes):
    assert len(ranges) == n_nodes
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layer
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert lo == hi                      # contiguous, in rank order
    assert all(hi > lo for lo, hi in ranges)  # every rank holds at least one layer
    held = [layer for lo, hi in ranges for layer in range(lo, hi)]
    assert held == list(range(n_layer))      # every layer exactly once


# --- even --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layer, n_nodes, expected", [
    (12, 3, [(0, 4), (4, 8), (8, 12)]),
    (12, 5, [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]),
    (24, 4, [(0, 6), (6, 12), (12, 18), (18, 24)]),
    (48, 3, [(0, 16), (16, 32), (32, 48)]),
    (12, 1, [(0, 12)]),
    (12, 12, [(i, i + 1) for i in range(12)]),
    (36, 5, [(0, 8), (8, 15), (15, 22), (22, 29), (29, 36)]),
])
def test_even_seed_tables(n_layer, n_nodes, expected):
    assert even(n_layer, n_nodes) == expected
    assert plan(n_layer, n_nodes) == expected


def test_even_and_balanced_cover_every_layer_once_for_many_sizes():
    for n_layer in range(1, 50):
        for n_nodes in range(1, min(n_layer, 9) + 1):
            e = even(n_layer, n_nodes)
            assert_covers_once(e, n_layer, n_nodes)
            assert max(counts(e)) - min(counts(e)) <= 1
            assert counts(e) == sorted(counts(e), reverse=True)   # remainder on the first ranks
            for head in (0.0, 2.6, 5.45):
                assert_covers_once(balanced(n_layer, n_nodes, head_cost=head), n_layer, n_nodes)


# --- balanced ----------------------------------------------------------------------------------

def test_head_cost_for_gpt2_is_about_5_4_blocks():
    assert head_cost_blocks(768) == pytest.approx(50257 / (12 * 768), rel=1e-12)
    assert head_cost_blocks(768) == pytest.approx(5.45, abs=0.01)


def test_balanced_gpt2_12_over_3_is_the_docstring_example():
    assert balanced(12, 3, n_embd=768) == [(0, 1), (1, 7), (7, 12)]
    assert plan(12, 3, strategy="balanced", n_embd=768) == [(0, 1), (1, 7), (7, 12)]


@pytest.mark.parametrize("n_layer, n_nodes, n_embd", [(12, 3, 768), (12, 2, 768), (24, 4, 1024),
                                                      (36, 3, 1280), (48, 3, 1600)])
def test_balanced_gives_rank0_fewer_layers_for_gpt2_models(n_layer, n_nodes, n_embd):
    b = counts(balanced(n_layer, n_nodes, n_embd=n_embd))
    assert b[0] < min(b[1:])
    assert b[0] < counts(even(n_layer, n_nodes))[0]


def slowest(c, head):
    return max([c[0] + head] + list(c[1:]))


def brute_force_best(n_layer, n_nodes, head):
    """Try every way to write n_layer as n_nodes positive counts."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, n_layer), n_nodes - 1):
        c = [b - a for a, b in zip((0,) + cuts, cuts + (n_layer,))]
        best = min(best, slowest(c, head))
    return best


def test_balanced_is_within_one_block_of_brute_force_optimum():
    for n_layer in range(1, 15):
        for n_nodes in range(1, min(n_layer, 5) + 1):
            for head in (0.0, 0.5, 2.6, 4.09, 5.45, 20.0):
                got = slowest(counts(balanced(n_layer, n_nodes, head_cost=head)), head)
                best = brute_force_best(n_layer, n_nodes, head)
                assert best <= got <= best + 1, (n_layer, n_nodes, head, got, best)


def test_balanced_with_no_head_cost_is_even():
    assert balanced(12, 3, head_cost=0) == even(12, 3)


def test_balanced_needs_head_cost_or_n_embd():
    with pytest.raises(PartitionError, match="head_cost or n_embd"):
        balanced(12, 3)


# --- explicit layer_mapping --------------------------------------------------------------------

@pytest.mark.parametrize("mapping", [
    {0: [0, 1], 1: [2, 7], 2: [8, 11]},
    {"0": [0, 1], "1": [2, 7], "2": [8, 11]},
    {0: "0-1", "1": "2-7", 2: "8 - 11"},
    {2: (8, 11), 0: (0, 1), 1: (2, 7)},       # key order does not matter
])
def test_from_mapping_accepts_inclusive_lists_strings_and_str_keys(mapping):
    assert from_mapping(mapping, 12, 3) == [(0, 2), (2, 8), (8, 12)]
    assert plan(12, 3, mapping=mapping) == [(0, 2), (2, 8), (8, 12)]
    assert plan(12, 3, strategy="mapping", mapping=mapping) == [(0, 2), (2, 8), (8, 12)]


def test_single_layer_rank():
    assert from_mapping({0: [0, 0], 1: "1-11"}, 12, 2) == [(0, 1), (1, 12)]
    assert from_mapping({0: [0], 1: "1-11"}, 12, 2) == [(0, 1), (1, 12)]          # [5]: one layer


def test_the_guides_layer_mapping_lists_every_layer():
    """The guide's custom distribution: 3, 4 and 5 layers, each rank's layers listed."""
    guide = {0: [0, 1, 2], 1: [3, 4, 5, 6], 2: [7, 8, 9, 10, 11]}
    assert from_mapping(guide, 12, 3) == [(0, 3), (3, 7), (7, 12)]
    assert plan(12, 3, mapping=guide) == [(0, 3), (3, 7), (7, 12)]


def test_two_consecutive_layers_mean_the_same_either_way():
    # [3, 4] read as "layers 3 and 4" or as [first, last]: both are layers 3..4
    assert from_mapping({0: [0, 1, 2], 1: [3, 4], 2: [5, 11]}, 12, 3) == [(0, 3), (3, 5), (5, 12)]
    assert from_mapping({0: "0-2", 1: "3-4", 2: "5-11"}, 12, 3) == [(0, 3), (3, 5), (5, 12)]


@pytest.mark.parametrize("layers, message", [
    ([3, 4, 6, 7], r"rank 1: \[3, 4, 6, 7\] skips layer 5;"),
    ([3, 6, 7], r"rank 1: \[3, 6, 7\] skips layers 4-5;"),
    ([3, 4, 4, 5], r"rank 1: \[3, 4, 4, 5\] goes from 4 back to 4;"),
    ([5, 4, 3], r"rank 1: \[5, 4, 3\] goes from 5 back to 4;"),
    ([], r"rank 1: expected a list of consecutive layers"),
])
def test_a_list_of_three_or_more_must_be_consecutive(layers, message):
    with pytest.raises(PartitionError, match=message):
        from_mapping({0: [0, 1, 2], 1: layers, 2: [8, 9, 10, 11]}, 12, 3)


@pytest.mark.parametrize("mapping, message", [
    ({0: [0, 3], 1: [5, 7], 2: [8, 11]}, r"layer 4 is held by no rank"),
    ({0: [1, 3], 1: [4, 7], 2: [8, 11]}, r"layer 0 is held by no rank"),
    ({0: [0, 3], 1: [4, 7], 2: [8, 10]}, r"layer 11 is held by no rank"),
    ({0: [0, 4], 1: [4, 7], 2: [8, 11]}, r"ranks 0 and 1 both hold layer 4\b"),
    ({0: [0, 11], 1: [4, 7], 2: [8, 11]}, r"ranks 0 and 1 both hold layers 4-7"),
    ({0: [0, 3], 1: [4, 7], 2: [8, 12]}, r"rank 2: layers 8-12 out of range; the model has 12"),
    ({0: [-1, 3], 1: [4, 7], 2: [8, 11]}, r"rank 0: layers -1-3 out of range"),
    ({0: [0, 3], 1: [8, 11], 2: [4, 7]}, r"out of order .*rank 1: 8-11, rank 2: 4-7"),
    ({0: [0, 3], 1: [4, 11]}, r"no entry for rank 2 .* 3 nodes, num_nodes: 3\); give each node its layers"),
    ({0: [0, 3], 2: [4, 7], 3: [8, 11]}, r"lists rank 3 but the cluster has 3 nodes"),
    ({0: [0, 3], 1: [4, 7], 2: [8, 9], 3: [10, 11]}, r"lists rank 3 but the cluster has 3 nodes"),
    ({0: [0, 3], "0": [4, 7], 2: [8, 11]}, r"lists rank 0 twice"),
    ({"zero": [0, 3], 1: [4, 7], 2: [8, 11]}, r"key 'zero' is not a rank number"),
    ({0: [3, 0], 1: [4, 7], 2: [8, 11]}, r"rank 0: first layer 3 is after last 0"),
    ({0: [0, 3], 1: "4..7", 2: [8, 11]}, r"rank 1: '4..7' is not \"first-last\""),
    ({0: [0, 3], 1: [4], 2: [8, 11]}, r"layers 5-7 are held by no rank"),
    ({0: [0, 3], 1: [4.0, 7], 2: [8, 11]}, r"rank 1: expected a list of consecutive layers"),
    ([[0, 3], [4, 7], [8, 11]], r"must map rank -> its layers"),
], ids=["gap", "gap-start", "gap-end", "overlap", "overlap-wide", "out-of-range",
        "negative", "non-contiguous-order", "missing-rank", "missing-rank-0-1", "extra-rank",
        "duplicate-rank", "bad-key", "reversed", "bad-string", "short-list", "float", "not-a-dict"])
def test_bad_mappings(mapping, message):
    with pytest.raises(PartitionError, match=message):
        from_mapping(mapping, 12, 3)


def test_partition_error_is_a_value_error():
    assert issubclass(PartitionError, ValueError)


# --- plan --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"n_layer": 12, "n_nodes": 13}, "13 nodes but only 12 layers"),
    ({"n_layer": 12, "n_nodes": 0}, "at least 1 node"),
    ({"n_layer": 12, "n_nodes": 3, "strategy": "random"}, "unknown partition strategy 'random'"),
    ({"n_layer": 12, "n_nodes": 3, "strategy": "mapping"}, "needs a layer_mapping"),
])
def test_plan_errors(kwargs, message):
    with pytest.raises(PartitionError, match=message):
        plan(**kwargs)


def test_more_nodes_than_layers_fails_in_every_strategy_that_gives_each_its_own():
    for fn in (lambda: even(2, 3), lambda: balanced(2, 3, head_cost=1.0)):
        with pytest.raises(PartitionError, match="3 nodes but only 2 layers"):
            fn()
    # a mapping may give two nodes the same layers (they split them): 3 nodes on 2 layers is fine
    assert from_mapping({0: [0, 0], 1: [1, 1], 2: [1, 1]}, 2, 3) == [(0, 1), (1, 2), (1, 2)]


# --- split stages: ranks given the very same layers share them ---------------------------------

def test_ranks_given_the_same_layers_form_one_stage():
    ranges = from_mapping({0: [0, 1, 2, 3], 1: list(range(4, 12)), 2: list(range(4, 12))}, 12, 3)
    assert ranges == [(0, 4), (4, 12), (4, 12)]
    assert groups(ranges) == [[0], [1, 2]]
    assert group_of(ranges, 2) == [1, 2] and group_of(ranges, 0) == [0]
    ranges = from_mapping({0: "0-1", 1: "2-5", 2: "2-5", 3: "2-5", 4: "6-11"}, 12, 5)
    assert groups(ranges) == [[0], [1, 2, 3], [4]]
    assert groups(plan(12, 3)) == [[0], [1], [2]]


@pytest.mark.parametrize("mapping, message", [
    ({0: [0, 3], 1: [4, 11], 2: [4, 10]},
     r"ranks 1 and 2 both hold layers 4-10 but not the same layers .*share the very same ones"),
    ({0: [0, 3], 1: [4, 9], 2: [6, 11]}, r"ranks 1 and 2 both hold layers 6-9 but not the same"),
    ({0: [0, 3], 1: [0, 3], 2: [4, 11]}, r"rank 0 \(the leader\) and rank 1 both hold layers 0-3; the leader "
                                         r"cannot share its layers yet"),
    ({0: [0, 3], 1: [4, 7], 2: [8, 11], 3: [4, 7]}, r"out of order .*or hold the same layers as rank r"),
], ids=["overlap-not-equal", "overlap-shifted", "leader-shares", "members-not-consecutive"])
def test_bad_split_stages(mapping, message):
    with pytest.raises(PartitionError, match=message):
        from_mapping(mapping, 12, len(mapping))


# --- bytes -------------------------------------------------------------------------------------

def test_block_params_match_gpt2_small():
    # gpt2-small has 124,439,808 parameters: 12 blocks + wte + wpe + ln_f
    c, v, t = 768, 50257, 1024
    assert block_params(c) == 12 * c * c + 13 * c == 7_087_872
    assert 12 * block_params(c) + v * c + t * c + 2 * c == 124_439_808


def test_stage_bytes_hand_computed():
    c, v, t = 768, 50257, 1024
    assert stage_bytes(4, c, v, t, rank0=False) == 4 * 4 * 7_087_872 == 113_405_952
    rank0 = 4 * (4 * 7_087_872 + v * c + t * c + 2 * c)   # the tied head is wte itself: no copy
    assert stage_bytes(4, c, v, t, rank0=True) == rank0 == 270_947_328
    assert stage_bytes(4, c, v, t, rank0=True, tied=False) == rank0 + 4 * v * c
    assert stage_bytes(0, c, v, t, rank0=False) == 0


def test_format_plan_table():
    text = format_plan(even(12, 3), names=["leader", "pi-1", "pi-2"])
    assert text.splitlines() == [
        "Node    Rank  Layers  Count",
        "leader     0  0-3         4",
        "pi-1       1  4-7         4",
        "pi-2       2  8-11        4",
    ]


def test_format_plan_with_weights_and_default_names():
    ranges = even(12, 5)
    text = format_plan(ranges, bytes_per_rank=[stage_bytes(hi - lo, 768, 50257, 1024, r == 0)
                                              for r, (lo, hi) in enumerate(ranges)])
    lines = text.splitlines()
    assert lines[0].split() == ["Node", "Rank", "Layers", "Count", "Weights", "MB"]
    # rank 0: 4 * (3 blocks + wte + wpe + ln_f; the tied head is wte itself) = 4 * 60,648,960 bytes
    assert lines[1].split() == ["rank0", "0", "0-2", "3", "242.6"]
    assert lines[5].split() == ["rank4", "4", "10-11", "2", "56.7"]     # 2 * 7,087,872 * 4 bytes
    with pytest.raises(PartitionError, match="2 names for 5 ranks"):
        format_plan(ranges, names=["a", "b"])


def test_layers_text_is_the_one_inclusive_text_form():
    from nanopipe.partition import first_last, layers_text
    assert layers_text(0, 4) == "0-3"
    assert layers_text(4, 12) == "4-11"
    assert layers_text(5, 6) == "5-5"           # one layer: still a range, as --layers takes it
    assert layers_text(12, 12) == "none"        # a node the placement left out
    assert layers_text(4, 12) == "-".join(map(str, first_last(4, 12)))   # the JSON form, same range


def test_a_split_stage_with_more_members_than_heads_is_refused():
    mapping = {0: [0, 1], 1: [2, 3], 2: [2, 3], 3: [2, 3]}
    assert from_mapping(mapping, 4, 4, n_head=3) == [(0, 2), (2, 4), (2, 4), (2, 4)]
    with pytest.raises(PartitionError, match=r"ranks 1-3 share layers 2-3 \(3 members\) but the model has only 2 "
                                             r"heads.*at most 2 ranks"):
        from_mapping(mapping, 4, 4, n_head=2)
