"""BlockManager: allocation arithmetic, refcounts, prefix-cache hits, LRU eviction order, invariants."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.protocol import SamplingParams
from engine.request import Request


def create_request(request_id: str, prompt: list[int], salt: str = "") -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=4), cache_salt=salt)


def computed(manager: BlockManager, request: Request) -> None:
    """Pretend the runner computed every allocated token that is known, and register full blocks."""
    request.num_computed_tokens = min(request.num_tokens, len(request.block_ids) * manager.block_size)
    manager.cache_full_blocks(request)


def test_allocate_covers_tokens_and_free_returns_blocks():
    manager = BlockManager(num_blocks=10, block_size=4)
    request = create_request("a", list(range(9)))
    assert manager.allocate_slots(request, 9)
    assert len(request.block_ids) == 3 and manager.num_free_blocks == 7
    request.num_computed_tokens = 9
    assert manager.allocate_slots(request, 3)  # 12 tokens: still 3 blocks
    assert len(request.block_ids) == 3
    assert manager.allocate_slots(request, 4)  # 13..: a 4th block
    assert len(request.block_ids) == 4
    manager.check_invariants([request])
    manager.free(request)
    assert manager.num_free_blocks == 10 and request.block_ids == []
    manager.check_invariants([])


def test_allocation_is_all_or_nothing():
    manager = BlockManager(num_blocks=3, block_size=4)
    request = create_request("a", list(range(20)))
    assert not manager.can_allocate(request, 20)
    assert not manager.allocate_slots(request, 20)
    assert request.block_ids == [] and manager.num_free_blocks == 3


def test_prefix_hit_requires_full_blocks_and_leaves_a_token_to_compute():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = create_request("a", list(range(12)))
    manager.allocate_slots(first, 12)
    computed(manager, first)
    same = create_request("b", list(range(12)))
    assert (
        manager.get_computed_blocks(same) == first.block_ids[:2]
    )  # the 3rd block holds the token to compute
    longer = create_request("c", list(range(13)))
    assert manager.get_computed_blocks(longer) == first.block_ids[:3]
    other = create_request("d", [99] + list(range(1, 13)))
    assert manager.get_computed_blocks(other) == []


def test_shared_blocks_are_refcounted_and_survive_one_free():
    manager = BlockManager(num_blocks=16, block_size=4)
    a = create_request("a", list(range(9)))
    manager.allocate_slots(a, 9)
    computed(manager, a)
    b = create_request("b", list(range(9)))
    hits = manager.get_computed_blocks(b)
    assert manager.allocate_slots(b, 1, hits)
    assert [manager.blocks[i].ref_count for i in hits] == [2, 2]
    manager.check_invariants([a, b])
    manager.free(a)
    assert [manager.blocks[i].ref_count for i in hits] == [1, 1]
    manager.check_invariants([b])


def test_freed_cached_blocks_are_hits_until_evicted_lru():
    manager = BlockManager(num_blocks=4, block_size=2)
    a = create_request("a", [1, 2, 3, 4, 5])  # blocks [1,2] [3,4] cached; [5] not full
    manager.allocate_slots(a, 5)
    computed(manager, a)
    manager.free(a)
    assert manager.num_free_blocks == 4
    b = create_request("b", [1, 2, 3, 4, 6])
    assert len(manager.get_computed_blocks(b)) == 2
    # 3 fresh blocks: the 2 uncached ones first, then the least recently freed cached one, [3,4], which
    # free() queued before [1,2] because tail blocks should go first.
    c = create_request("c", [7, 8, 9, 10, 11, 12])
    manager.allocate_slots(c, 6)
    assert len(manager.get_computed_blocks(b)) == 1  # [1,2] survived, [3,4] was evicted
    manager.check_invariants([c])


def test_hash_collision_never_serves_wrong_tokens():
    manager = BlockManager(num_blocks=8, block_size=2)
    a = create_request("a", [1, 2, 3])
    manager.allocate_slots(a, 3)
    computed(manager, a)
    b = create_request("b", [5, 6, 7])
    manager._block_hashes(b, 1)
    b.block_hashes[0] = a.block_hashes[0]  # force a collision
    assert manager.get_computed_blocks(b) == []


def test_salt_separates_caches():
    manager = BlockManager(num_blocks=8, block_size=2)
    a = create_request("a", [1, 2, 3], salt="tenant-a")
    manager.allocate_slots(a, 3)
    computed(manager, a)
    assert manager.get_computed_blocks(create_request("b", [1, 2, 3], salt="tenant-b")) == []
    assert len(manager.get_computed_blocks(create_request("c", [1, 2, 3], salt="tenant-a"))) == 1


def test_invariants_catch_a_leak():
    manager = BlockManager(num_blocks=4, block_size=2)
    a = create_request("a", [1, 2, 3])
    manager.allocate_slots(a, 3)
    with pytest.raises(AssertionError):
        manager.check_invariants([])  # a holds blocks the caller forgot


def test_disabled_prefix_caching_never_hits():
    manager = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = create_request("a", [1, 2, 3])
    manager.allocate_slots(a, 3)
    computed(manager, a)
    assert manager.get_computed_blocks(create_request("b", [1, 2, 3])) == []
