"""The first pass's constrained choice (server.engines.common.label_walk), shared by both engines.

The walk is driven here by a table of log-probabilities standing in for a model: what is under test is the
walk (which prefixes it asks for, which candidate it picks, the tokens it counts), not a model.
"""

import asyncio
import math

from server.engines.common import label_walk, walk_async, walk_sync


def _table(rows):
    """{tuple(prefix): {token: logp}} → a next_logprobs function that records what it was asked."""
    asked = []

    def next_logprobs(prefix, allowed):
        asked.append((tuple(prefix), tuple(allowed)))
        dist = rows[tuple(prefix)]
        return {t: dist.get(t, -math.inf) for t in allowed}
    return next_logprobs, asked


def test_distinct_first_tokens_take_one_prefill():
    fn, asked = _table({(1, 2): {10: -2.0, 11: -0.5, 12: -3.0}})
    s = walk_sync(label_walk([1, 2], [[10], [11, 5], [12]]), fn)
    assert s.best == 1 and s.forward_tokens == 2
    assert asked == [((1, 2), (10, 11, 12))]
    assert abs(sum(s.probs) - 1) < 1e-9 and max(s.probs) == s.probs[1]


def test_shared_first_token_walks_only_where_candidates_part():
    # candidates 0 and 1 share tokens 10, 20; they part at depth 2 (30 vs 31); candidate 2 starts with 11.
    # The step after (1, 10) allows only 20: its answer is known, so the model is not asked for it.
    rows = {(1,): {10: -0.1, 11: -3.0}, (1, 10, 20): {30: -2.0, 31: -0.3}}
    fn, asked = _table(rows)
    s = walk_sync(label_walk([1], [[10, 20, 30], [10, 20, 31], [11]]), fn)
    assert s.best == 1
    assert asked == [((1,), (10, 11)), ((1, 10, 20), (30, 31))]
    assert s.forward_tokens == 1 + 3
    assert s.probs[0] == s.probs[1]           # the same first token: the same probability


def test_a_prefix_candidate_ends_the_walk():
    # candidate 0 = [10] is a prefix of candidate 1 = [10, 20]: nothing left to compare beyond depth 1,
    # and the one token left to candidate 1 needs no forward
    fn, asked = _table({(1,): {10: -0.1, 11: -2.0}})
    s = walk_sync(label_walk([1], [[10], [10, 20], [11]]), fn)
    assert s.best == 1 and len(asked) == 1 and s.forward_tokens == 1


def test_ties_go_to_the_lowest_index_and_async_agrees():
    rows = {(7,): {3: -1.0, 4: -1.0}}
    fn, _ = _table(rows)
    assert walk_sync(label_walk([7], [[4], [3]]), fn).best == 0

    async def afn(prefix, allowed):
        return fn(prefix, allowed)
    a = asyncio.run(walk_async(label_walk([7], [[4], [3]]), afn))
    assert a == walk_sync(label_walk([7], [[4], [3]]), fn)


def test_first_answer_can_come_from_a_batched_prefill():
    fn, asked = _table({(1,): {10: -5.0, 11: -0.1}})
    s = walk_sync(label_walk([1], [[10], [11]]), fn, first={10: -0.1, 11: -5.0})
    assert s.best == 0 and asked == []        # the batched scores were used, the table never asked
