"""Paged KV block manager: refcounted blocks, prefix caching over a hash chain, LRU eviction of cached free blocks.

A block holds `block_size` consecutive tokens of one sequence; slot = block_id * block_size + offset.
Full blocks are registered under a hash chain h_i = hash(h_{i-1}, cache_salt, tokens of block i), so two requests
with the same salt and the same first k·B tokens share k blocks (refcount k). A block whose refcount drops to 0
goes back to the free queue but keeps its hash: it is a cache hit until it is evicted, least recently freed first.

    free queue (head = evicted first)  ─▶  [uncached ... | cached LRU ... MRU]

Torch-free. The verbs come in pairs as in nano-vllm: get_computed_blocks / allocate_slots / free.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # kept with the hash so a hash collision can never serve wrong KV


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self._num_registered: dict[
            str, int
        ] = {}  # request_id -> number of its blocks registered in the cache
        self._num_cached_free = 0  # free blocks that still hold a hash (kept exact on every transition)
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ---- queries -----------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks whose prefix-cache content is still there: hits until evicted (counted in free)."""
        return self._num_cached_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- prefix cache ------------------------------------------------------------------------------------

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        """Extend the request's hash chain to cover its first num_full_blocks blocks (all tokens known)."""
        hashes = request.block_hashes
        size = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            tokens = tuple(request.token_ids_slice(i * size, (i + 1) * size))
            prev = hashes[-1] if hashes else 0
            hashes.append(hash((prev, request.cache_salt, tokens)))
        return hashes

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Blocks of the longest cached prefix of the request's tokens. At least one token is left to compute,
        because the step that computes the last token is the one that samples."""
        if not self.enable_prefix_caching or request.num_computed_tokens > 0:
            return []
        num_full = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, num_full)
        block_ids: list[int] = []
        for i in range(num_full):
            block_id = self.hash_to_block_id.get(hashes[i])
            if block_id is None:
                break
            tokens = tuple(request.token_ids_slice(i * self.block_size, (i + 1) * self.block_size))
            if self.blocks[block_id].token_ids != tokens:
                break
            block_ids.append(block_id)
        return block_ids

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that became full of computed tokens since the last call."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        size = self.block_size
        for i in range(start, num_full):
            block = self.blocks[request.block_ids[i]]
            if block.hash is not None:  # shared prefix block, already registered
                continue
            if hashes[i] in self.hash_to_block_id:  # an identical block computed concurrently keeps the entry
                continue
            block.hash = hashes[i]
            block.token_ids = tuple(request.token_ids_slice(i * size, (i + 1) * size))
            self.hash_to_block_id[block.hash] = block.block_id
        self._num_registered[request.request_id] = num_full

    # ---- allocation --------------------------------------------------------------------------------------

    def can_allocate(self, request: Request, num_new_tokens: int, computed_block_ids: list[int] = ()) -> bool:
        """Whether allocate_slots with the same arguments would succeed."""
        return self._num_blocks_short(request, num_new_tokens, computed_block_ids) <= 0

    def _num_blocks_short(self, request: Request, num_new_tokens: int, computed_block_ids) -> int:
        num_held = len(request.block_ids) + len(computed_block_ids)
        num_tokens_after = (
            request.num_computed_tokens + len(computed_block_ids) * self.block_size + num_new_tokens
        )
        num_new_blocks = max(0, self.num_blocks_for(num_tokens_after) - num_held)
        # Touching a cached block with refcount 0 takes it out of the free queue, too.
        num_revived = sum(1 for b in computed_block_ids if self.blocks[b].ref_count == 0)
        return num_new_blocks + num_revived - self.num_free_blocks

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_block_ids: list[int] = ()
    ) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens after its computed ones (and after the
        cached prefix `computed_block_ids`, which it takes a reference on). All or nothing."""
        if not self.can_allocate(request, num_new_tokens, computed_block_ids):
            return False
        for block_id in computed_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
                self._num_cached_free -= block.hash is not None  # a cache hit: always true in practice
            block.ref_count += 1
        request.block_ids.extend(computed_block_ids)
        if computed_block_ids:
            self._num_registered[request.request_id] = len(request.block_ids)
        num_tokens_after = (
            request.num_computed_tokens + len(computed_block_ids) * self.block_size + num_new_tokens
        )
        for _ in range(self.num_blocks_for(num_tokens_after) - len(request.block_ids)):
            request.block_ids.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: this block's cached content is gone
            self._num_cached_free -= 1
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block_id

    def free(self, request: Request) -> None:
        """Drop the request's references. Tail blocks are queued first so that they are evicted before the
        prefix blocks that other requests are more likely to share (as vLLM does); uncached blocks go to the
        head of the queue, to be reused before any cached content is evicted."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
                else:
                    self._num_cached_free += 1
        request.block_ids = []
        self._num_registered.pop(request.request_id, None)

    def adopt(self, request: Request) -> None:
        """Take a reference on each block of a request that arrives with a block table already written in this
        pool (a KunServe regroup copied its KV here). Its full blocks re-enter the prefix cache on the next
        cache_full_blocks, as the hash chain is recomputed from its tokens."""
        for block_id in request.block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
                self._num_cached_free -= block.hash is not None
            block.ref_count += 1
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block_id in self.free_queue:
            self.blocks[block_id].hash = None
            self.blocks[block_id].token_ids = ()
        self._num_cached_free = 0
        self.hash_to_block_id = {h: b for h, b in self.hash_to_block_id.items() if self.blocks[b].hash == h}

    # ---- invariants --------------------------------------------------------------------------------------

    def check_invariants(self, live_requests: list[Request] | None = None) -> None:
        """Raise AssertionError if the pool is inconsistent. `live_requests`: every request holding blocks."""
        assert self.num_free_blocks + self.num_used_blocks == self.num_blocks
        for block in self.blocks:
            assert block.ref_count >= 0, f"negative refcount on {block}"
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), (
                f"free queue disagrees on {block}"
            )
        num_cached_free = sum(1 for b in self.free_queue if self.blocks[b].hash is not None)
        assert self._num_cached_free == num_cached_free, f"{self._num_cached_free=} != {num_cached_free}"
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == h, f"hash map points at block {block_id} with another hash"
        if live_requests is None:
            return
        expected = [0] * self.num_blocks
        for request in live_requests:
            assert len(set(request.block_ids)) == len(request.block_ids), f"{request} holds a block twice"
            assert len(request.block_ids) * self.block_size >= request.num_computed_tokens, (
                f"{request} lacks blocks"
            )
            for block_id in request.block_ids:
                expected[block_id] += 1
        got = [b.ref_count for b in self.blocks]
        assert got == expected, "refcounts differ from the blocks the live requests hold"
