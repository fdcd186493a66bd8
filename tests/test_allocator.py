"""The CUDA caching-allocator simulation against its C++ rules (c10/cuda/CUDACachingAllocator.cpp), on hand-made
sequences whose results follow from those rules, and the reserved/device fields of the memory estimate."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from petlbench.core.method import BackboneSpec
from petlbench.profiling import estimate_training_memory
from petlbench.profiling.allocator import (
    CUDA_CONTEXT_MB,
    K_LARGE_BUFFER,
    K_SMALL_BUFFER,
    NULL_HANDLE,
    CachingAllocatorSim,
    device_memory_mb,
    is_small,
    round_size,
    segment_size,
    transient_events,
)
from petlbench.profiling.memory_estimate import MEM_KINDS
from petlbench.profiling.profile import make_method

KIB, MIB = 2**10, 2**20
TINY = BackboneSpec("test_vit")


def check_invariants(sim: CachingAllocatorSim) -> None:
    """Blocks tile their segments exactly, no two free neighbours are left unmerged, the stats add up."""
    layout = sim.layout()
    assert sum(size for _, size, allocated in layout if allocated) == sim.allocated
    assert sum(size for _, size in sim.segments) == sim.reserved
    for addr, size in sim.segments:
        inside = [b for b in layout if addr <= b[0] < addr + size]
        assert inside[0][0] == addr and sum(b[1] for b in inside) == size
        assert all(a[0] + a[1] == b[0] for a, b in zip(inside, inside[1:], strict=False))
        assert not any(not a[2] and not b[2] for a, b in zip(inside, inside[1:], strict=False))
    assert sim.allocated <= sim.reserved <= sim.peak_reserved and sim.allocated <= sim.peak_allocated


# ------------------------------------------------------------------------------------- sizes and pools
def test_round_size_to_512_byte_blocks() -> None:
    """`round_size`: below kMinBlockSize -> 512, else up to a multiple of 512 (no power-of-2 divisions by default)."""
    assert [round_size(n) for n in (0, 1, 511, 512, 513, 1024, 1025)] == [512, 512, 512, 512, 1024, 1024, 1536]
    assert round_size(MIB) == MIB and is_small(MIB)  # kSmallSize itself is still small
    assert round_size(MIB + 1) == MIB + 512 and not is_small(MIB + 1)


def test_segment_sizes() -> None:
    """`get_allocation_size`: small -> kSmallBuffer; < kMinLargeAlloc -> kLargeBuffer; else a multiple of kRoundLarge.
    10 MiB - 1 byte rounds to exactly 10 MiB = kMinLargeAlloc, which is no longer "< kMinLargeAlloc"."""
    assert segment_size(1) == segment_size(256 * KIB) == segment_size(MIB) == K_SMALL_BUFFER == 2 * MIB
    assert segment_size(MIB + 1) == segment_size(5 * MIB) == segment_size(10 * MIB - 512) == K_LARGE_BUFFER
    assert segment_size(10 * MIB - 1) == segment_size(10 * MIB) == 10 * MIB
    assert segment_size(11 * MIB) == segment_size(12 * MIB) == 12 * MIB
    assert segment_size(12 * MIB + 1) == 14 * MIB


def test_zero_bytes_and_bad_handles() -> None:
    """`NativeCachingAllocator::allocate` skips `malloc` for 0 bytes (a null pointer, freed as a no-op)."""
    sim = CachingAllocatorSim()
    assert sim.malloc(0) == NULL_HANDLE and sim.reserved == 0 and sim.num_mallocs == 0
    sim.free(NULL_HANDLE)
    h = sim.malloc(1)
    sim.free(h)
    with pytest.raises(KeyError):
        sim.free(h)
    with pytest.raises(ValueError):
        sim.malloc(-1)


# ------------------------------------------------------------------------------------- splitting and reuse
def test_two_small_allocations_share_one_segment() -> None:
    """256 KiB twice: one 2 MiB segment, split after each (remainders 1.75 and 1.5 MiB >= kMinBlockSize)."""
    sim = CachingAllocatorSim()
    a, b = sim.malloc(256 * KIB), sim.malloc(256 * KIB)
    assert (sim.reserved, sim.allocated, sim.num_segments) == (2 * MIB, 512 * KIB, 1)
    assert sim.block(a) == (0, 256 * KIB) and sim.block(b) == (256 * KIB, 256 * KIB)
    check_invariants(sim)


def test_free_then_malloc_reuses_the_cached_block() -> None:
    """A freed block goes back to its pool and the next request of that size gets it: reserved does not grow; a
    fully freed 2 MiB segment serves two 1 MiB requests, and only a third needs a new segment."""
    sim = CachingAllocatorSim()
    a = sim.malloc(256 * KIB)
    sim.free(a)
    assert (sim.reserved, sim.allocated) == (2 * MIB, 0)
    b = sim.malloc(256 * KIB)
    assert sim.block(b) == (0, 256 * KIB) and sim.reserved == 2 * MIB
    sim.free(b)
    sim.malloc(MIB), sim.malloc(MIB)
    assert (sim.reserved, sim.num_segments, sim.free_blocks) == (2 * MIB, 1, 0)
    sim.malloc(MIB)
    assert (sim.reserved, sim.num_segments) == (4 * MIB, 2)
    check_invariants(sim)


def test_small_pool_is_not_lent_to_large_requests() -> None:
    """20 x 1 MiB fill ten 2 MiB small segments (20 MiB); freed, they stay cached in the small pool, so a 12 MiB
    request cudaMallocs a new 12 MiB segment (32 MiB), and so does a 1 MiB + 1 byte one (a 20 MiB segment)."""
    sim = CachingAllocatorSim()
    handles = [sim.malloc(MIB) for _ in range(20)]
    assert (sim.reserved, sim.num_segments) == (20 * MIB, 10)
    for h in handles:
        sim.free(h)
    assert sim.allocated == 0 and sim.free_blocks == 10  # each segment merged back into one 2 MiB block
    sim.malloc(12 * MIB)
    assert (sim.reserved, sim.num_segments) == (32 * MIB, 11)
    sim.malloc(MIB + 1)
    assert sim.reserved == 52 * MIB
    check_invariants(sim)


def test_large_pool_split_threshold() -> None:
    """Large pool splits only if the remainder is > kSmallSize: in a 20 MiB segment after 5 MiB, 14 MiB leaves 1 MiB
    (not split: the whole 15 MiB block is handed out and counted allocated), 13.5 MiB leaves 1.5 MiB (split)."""
    sim = CachingAllocatorSim()
    sim.malloc(5 * MIB)
    assert (sim.reserved, sim.allocated, sim.free_blocks) == (20 * MIB, 5 * MIB, 1)
    b = sim.malloc(14 * MIB)
    assert sim.block(b) == (5 * MIB, 15 * MIB) and sim.allocated == 20 * MIB and sim.free_blocks == 0

    sim = CachingAllocatorSim()
    sim.malloc(5 * MIB)
    b = sim.malloc(13 * MIB + 512 * KIB)
    assert sim.block(b)[1] == 13 * MIB + 512 * KIB and sim.free_blocks == 1
    c = sim.malloc(MIB + 512 * KIB)  # large pool (> 1 MiB): the 1.5 MiB remainder fits exactly
    assert sim.block(c) == (18 * MIB + 512 * KIB, MIB + 512 * KIB)
    assert (sim.reserved, sim.allocated, sim.num_segments) == (20 * MIB, 20 * MIB, 1)

    # a new segment too: 13 MiB -> 14 MiB segment, 1 MiB left, unsplit; 12.5 MiB -> 14 MiB, 1.5 MiB left, split
    sim = CachingAllocatorSim()
    d = sim.malloc(13 * MIB)
    assert sim.block(d) == (0, 14 * MIB) and sim.allocated == 14 * MIB
    e = sim.malloc(12 * MIB + 512 * KIB)
    assert sim.block(e) == (14 * MIB, 12 * MIB + 512 * KIB) and sim.reserved == 28 * MIB and sim.free_blocks == 1
    check_invariants(sim)


def test_small_pool_split_threshold() -> None:
    """Small pool splits if the remainder is >= kMinBlockSize: 1 MiB - 512 leaves 1 MiB + 512, 1 MiB then leaves
    exactly 512 bytes (split), which a 1-byte request takes; the 2 MiB segment ends full with no new one."""
    sim = CachingAllocatorSim()
    sim.malloc(MIB - 512)
    b = sim.malloc(MIB)
    assert sim.block(b) == (MIB - 512, MIB) and sim.free_blocks == 1
    c = sim.malloc(1)
    assert sim.block(c) == (2 * MIB - 512, 512)
    assert (sim.reserved, sim.allocated, sim.num_segments, sim.free_blocks) == (2 * MIB, 2 * MIB, 1, 0)
    check_invariants(sim)


# ------------------------------------------------------------------------------------- coalescing and best fit
def test_coalescing_lets_a_larger_request_fit() -> None:
    """Three 5 MiB blocks split one 20 MiB segment (5 MiB left at the end); freeing the first two merges them into
    one 10 MiB block that a 10 MiB request gets (without merging it would cudaMalloc a 10 MiB segment). Freeing
    the rest merges across both neighbours back into one 20 MiB block that a 20 MiB request reuses."""
    sim = CachingAllocatorSim()
    a, b, c = (sim.malloc(5 * MIB) for _ in range(3))
    assert [sim.block(h)[0] for h in (a, b, c)] == [0, 5 * MIB, 10 * MIB] and sim.free_blocks == 1
    sim.free(a)
    sim.free(b)
    assert sim.free_blocks == 2
    d = sim.malloc(10 * MIB)
    assert sim.block(d) == (0, 10 * MIB) and (sim.reserved, sim.num_segments) == (20 * MIB, 1)
    sim.free(c)  # merges with the 5 MiB tail
    sim.free(d)  # merges with both neighbours
    assert sim.free_blocks == 1 and sim.layout() == [(0, 20 * MIB, False)]
    e = sim.malloc(20 * MIB)
    assert sim.block(e) == (0, 20 * MIB) and sim.reserved == 20 * MIB
    check_invariants(sim)


def test_best_fit_smallest_block_then_lowest_address() -> None:
    """`BlockComparatorSize` order: 12, 16 and 14 MiB segments freed, a 13 MiB request takes the 14 MiB block
    (1 MiB remainder: unsplit); of two equal 12 MiB blocks the lower address goes first, whatever the free order."""
    sim = CachingAllocatorSim()
    handles = [sim.malloc(n * MIB) for n in (12, 16, 14)]
    assert [s for _, s in sim.segments] == [12 * MIB, 16 * MIB, 14 * MIB]
    for h in handles:
        sim.free(h)
    w = sim.malloc(13 * MIB)
    assert sim.block(w) == (28 * MIB, 14 * MIB) and sim.reserved == 42 * MIB

    sim = CachingAllocatorSim()
    p, q = sim.malloc(12 * MIB), sim.malloc(12 * MIB)
    sim.free(q)
    sim.free(p)
    assert sim.block(sim.malloc(12 * MIB)) == (0, 12 * MIB)
    assert sim.block(sim.malloc(12 * MIB)) == (12 * MIB, 12 * MIB) and sim.num_segments == 2


def test_peak_tracking() -> None:
    """Allocated goes up and down, reserved only up (no release on an unlimited device); `reset_peak` restarts."""
    sim = CachingAllocatorSim()
    a, b = sim.malloc(5 * MIB), sim.malloc(5 * MIB)
    sim.free(a)
    assert (sim.allocated, sim.peak_allocated, sim.reserved) == (5 * MIB, 10 * MIB, 20 * MIB)
    c = sim.malloc(30 * MIB)  # >= kMinLargeAlloc: its own 30 MiB segment
    assert (sim.allocated, sim.peak_allocated) == (35 * MIB, 35 * MIB)
    assert (sim.reserved, sim.peak_reserved) == (50 * MIB, 50 * MIB)
    sim.free(b)
    sim.free(c)
    assert (sim.allocated, sim.peak_allocated, sim.reserved, sim.peak_reserved) == (0, 35 * MIB, 50 * MIB, 50 * MIB)
    sim.reset_peak()
    assert (sim.peak_allocated, sim.peak_reserved) == (0, 50 * MIB)


def test_random_sequence_keeps_invariants() -> None:
    """A seeded mix of sizes across both pools and the 10 MiB boundary, checked after every call."""
    rng = random.Random(0)
    sim = CachingAllocatorSim()
    live: list[int] = []
    sizes = [1, 512, 700, 100 * KIB, MIB, MIB + 1, 3 * MIB, 10 * MIB - 1, 10 * MIB, 17 * MIB + 5]
    for _ in range(600):
        if live and rng.random() < 0.45:
            sim.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(sim.malloc(rng.choice(sizes) * rng.choice((1, 1, 2))))
        check_invariants(sim)
    for h in live:
        sim.free(h)
    check_invariants(sim)
    assert sim.allocated == 0 and sim.reserved == sim.peak_reserved


def test_replay_and_transient_events() -> None:
    """Events replay by serial (unknown frees ignored); transients are what a window both makes and frees."""
    sim = CachingAllocatorSim()
    live = sim.replay([("malloc", 1, 100), ("malloc", 2, 600), ("free", 2, 0), ("free", 7, 0)])
    assert list(live) == [1] and sim.allocated == 512 and sim.peak_allocated == 512 + 1024
    events = [("malloc", 1, 10), ("malloc", 2, 20), ("free", 1, 0), ("free", 3, 0), ("malloc", 4, 5)]
    assert transient_events(events, 0, len(events)) == [("malloc", 1, 10), ("free", 1, 0)]
    assert transient_events(events, 1, len(events)) == []


def test_device_memory_needs_a_measured_context() -> None:
    """No made-up context size: None with a reason unless the GPU has a measured entry."""
    assert device_memory_mb(None, None)[0] is None
    value, reason = device_memory_mb(100 * MIB, None)
    assert value is None and reason is not None and "petlbench validate" in reason
    value, reason = device_memory_mb(100 * MIB, "Some GPU")
    assert value is None and reason is not None and "Some GPU" in reason
    for gpu, mb in CUDA_CONTEXT_MB.items():
        assert device_memory_mb(100 * MIB, gpu) == (100 + mb, None)


# ------------------------------------------------------------------------------------- the estimate's fields
def test_tiny_vit_estimate_reports_three_memory_kinds() -> None:
    est = estimate_training_memory(make_method("full_ft"), TINY, 64, 4)
    d = est.to_dict()
    assert est.reserved_peak_bytes is not None and est.reserved_peak_bytes % K_SMALL_BUFFER == 0
    assert d["est_reserved_mem_mb"] == est.reserved_peak_bytes / MIB >= d["est_peak_mem_mb"] > 0
    assert d["est_device_mem_mb"] is None and "CUDA context" in d["est_device_mem_reason"]
    assert d["mem_kinds"] == MEM_KINDS and d["mem_kinds"]["est_peak_mem_mb"] == "allocated"
    json.dumps(d)
    cpu = estimate_training_memory(make_method("full_ft"), TINY, 64, 4, target="cpu").to_dict()
    assert cpu["est_reserved_mem_mb"] is None and cpu["est_device_mem_mb"] is None and cpu["est_device_mem_reason"]
    assert cpu["est_peak_mem_mb"] != d["est_peak_mem_mb"]  # cpu: no 512-byte rounding


@pytest.mark.parametrize("key", ["full_ft", "adalora", "fpt_plus"])
def test_reserved_is_the_same_for_every_engine_and_warmup(key: str) -> None:
    """The prime-mode replay (setup, the measured step as first step with the primed optimizer step, then again)
    gives what the fake engine's two full steps give (AdaLoRA: state replaced every step; FPT+: preloaded batch)."""
    method = make_method(key)
    runs = [
        estimate_training_memory(method, TINY, 64, 4, engine=engine, warmup=warmup)
        for engine, warmup in (("meta", "prime"), ("fake", "prime"), ("fake", "full"))
    ]
    assert len({r.peak_bytes for r in runs}) == 1
    assert len({r.reserved_peak_bytes for r in runs}) == 1


GPU_SCRIPT = """
import json, random, torch
from petlbench.profiling.allocator import CachingAllocatorSim
rng = random.Random(1)
sizes = [1, 700, 100 * 1024, 2**20, 2**20 + 1, 3 * 2**20, 10 * 2**20 - 1, 17 * 2**20 + 5]
sim, live, out = CachingAllocatorSim(), [], []
torch.cuda.init()
a0, r0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
for _ in range(400):
    if live and rng.random() < 0.45:
        ptr, h = live.pop(rng.randrange(len(live)))
        torch.cuda.caching_allocator_delete(ptr)
        sim.free(h)
    else:
        n = rng.choice(sizes) * rng.choice((1, 2))
        live.append((torch.cuda.caching_allocator_alloc(n), sim.malloc(n)))
    real = (torch.cuda.memory_allocated() - a0, torch.cuda.memory_reserved() - r0)
    out.append([real, [sim.allocated, sim.reserved]])
print(json.dumps(out))
"""


@pytest.mark.gpu
def test_simulation_matches_the_real_caching_allocator() -> None:
    """On a GPU, in a fresh process with default allocator settings: allocated and reserved after every call."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTORCH_CUDA_ALLOC", "PYTORCH_ALLOC"))}
    done = subprocess.run([sys.executable, "-c", GPU_SCRIPT], capture_output=True, text=True, env=env, check=True)
    for i, (real, simulated) in enumerate(json.loads(done.stdout)):
        assert real == simulated, (i, real, simulated)
