"""Reserved CUDA memory without a GPU: a simulation of PyTorch's native CUDA caching allocator (default settings).

Three memory kinds (profiling.md §2)
------------------------------------
* **allocated**: bytes in blocks handed to tensors (`torch.cuda.max_memory_allocated`); the estimator's
  `est_peak_mem_mb`.
* **reserved**: bytes in segments the caching allocator obtained with `cudaMalloc` and keeps cached
  (`torch.cuda.max_memory_reserved`); `CachingAllocatorSim.peak_reserved` replayed on the estimator's
  allocation/free sequence, `est_reserved_mem_mb`.
* **device**: what nvidia-smi shows for the process: reserved plus the CUDA context (driver, kernels' code,
  cuBLAS/cuDNN handles). The context size is a per-GPU constant that can only be measured; `CUDA_CONTEXT_MB`
  holds the measured ones and is empty until `petlbench validate` has measured one, so `est_device_mem_mb` is
  None with a reason (never a made-up or fitted value).

Rules simulated (source: pytorch/pytorch `c10/cuda/CUDACachingAllocator.cpp`, class `DeviceCachingAllocator`, with
the defaults of `c10/core/AllocatorConfig.{h,cpp}` / `c10/cuda/CUDAAllocatorConfig.h`; background in the "CUDA
semantics: memory management" notes, https://docs.pytorch.org/docs/stable/notes/cuda.html#memory-management)
--------------------------------------------------------------------------------------------------------------
* `NativeCachingAllocator::allocate`: a 0-byte request allocates nothing.
* `round_size`: requests below `kMinBlockSize` (512) become 512 bytes, others are rounded up to a multiple of 512
  (`roundup_power2_divisions` defaults to 0 for every interval, so the power-of-two rounding is off).
* `get_pool`: rounded sizes <= `kSmallSize` (1 MiB) go to the small pool, larger ones to the large pool; the
  pools never lend to each other.
* `get_free_block`: best fit, the first free block of the pool in `BlockComparatorSize` order (stream, then size,
  then address) whose size is >= the request: the smallest block that fits, ties to the lowest address. The
  `max_split_size` checks never trigger at the default `max_split_size` = SIZE_MAX (unlimited).
* `get_allocation_size` (a new segment when no free block fits, `alloc_block` = `cudaMalloc`): `kSmallBuffer`
  (2 MiB) for the small pool; `kLargeBuffer` (20 MiB) for sizes < `kMinLargeAlloc` (10 MiB); otherwise the size
  rounded up to a multiple of `kRoundLarge` (2 MiB).
* `should_split` / `alloc_found_block`: the found block is split, its head handed out and the rest returned to the
  pool, if the rest is >= `kMinBlockSize` (small pool) or > `kSmallSize` (large pool; `size < max_split_size`
  always holds at the default). An unsplit block is handed out whole and counts whole in `allocated_bytes`, so
  this simulator's `allocated` can exceed the sum of rounded request sizes by up to 1 MiB per large block.
* `free_block` / `try_merge_blocks`: a freed block merges with its free neighbours in the same segment (previous,
  then next) and returns to its pool.
* Segments are only released (`release_cached_blocks`, `release_available_cached_blocks`) when `cudaMalloc` fails
  or on `empty_cache()`. The simulated device is unlimited, so reserved memory never shrinks and its peak is its
  final value.

Assumptions and what is not modelled: one device and one stream (no `record_stream`, no cross-stream events, so a
freed block is reusable at once); `cudaMalloc` returns increasing addresses (only the tie-break between equal-size
free blocks depends on it); no expandable segments, CUDA-graph private pools, memory fraction or garbage-collection
threshold (all off by default); allocations the estimator cannot see (cuBLAS/cuDNN workspaces, kernels' internal
buffers) are missing here as in the allocated estimate.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

MIB = 2**20

# Constants of c10/cuda/CUDACachingAllocator.cpp (kLargeBuffer also in c10/core/AllocatorConfig.h).
K_MIN_BLOCK_SIZE = 512  # kMinBlockSize: all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = MIB  # kSmallSize: largest "small" allocation is 1 MiB
K_SMALL_BUFFER = 2 * MIB  # kSmallBuffer: "small" allocations are packed in 2 MiB segments
K_LARGE_BUFFER = 20 * MIB  # kLargeBuffer: "large" allocations may be packed in 20 MiB segments
K_MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc: allocations between 1 and 10 MiB may use kLargeBuffer
K_ROUND_LARGE = 2 * MIB  # kRoundLarge: round up large segments to 2 MiB

NULL_HANDLE = 0  # what malloc(0) returns (a null data pointer); free(NULL_HANDLE) does nothing

# Measured CUDA context size (MiB) per GPU name (`torch.cuda.get_device_name()`): device-level memory in use
# (nvidia-smi / NVML) minus `torch.cuda.memory_reserved()` in a process that has initialised CUDA and run a step.
# Entries must come from `petlbench validate` output committed under results/reference/ (cite the file next to
# the entry); never a guessed or fitted value. Empty until such a measurement exists.
CUDA_CONTEXT_MB: dict[str, float] = {}

# An allocation event of the estimator's replay: ("malloc", serial, nbytes) or ("free", serial, 0).
Event = tuple[str, int, int]


def round_size(nbytes: int) -> int:
    """Request size as the allocator rounds it (`round_size`, default settings)."""
    if nbytes < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    return -(-nbytes // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE


def is_small(nbytes: int) -> bool:
    """Whether a request of `nbytes` is served from the small pool (`get_pool`)."""
    return round_size(nbytes) <= K_SMALL_SIZE


def segment_size(nbytes: int) -> int:
    """Bytes `cudaMalloc`ed for a new segment when a request of `nbytes` finds no free block (`get_allocation_size`)."""
    size = round_size(nbytes)
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE


class _Block:
    """A contiguous range of one segment, allocated or free (`Block`)."""

    __slots__ = ("addr", "size", "small", "allocated", "prev", "next")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr = addr
        self.size = size
        self.small = small
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None


class _FreePool:
    """The free blocks of one pool in `BlockComparatorSize` order: size, then address (one stream)."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []
        self._blocks: dict[tuple[int, int], _Block] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def blocks(self) -> list[_Block]:
        return list(self._blocks.values())

    def add(self, block: _Block) -> None:
        key = (block.size, block.addr)
        bisect.insort(self._keys, key)
        self._blocks[key] = block

    def remove(self, block: _Block) -> None:
        key = (block.size, block.addr)
        del self._keys[bisect.bisect_left(self._keys, key)]
        del self._blocks[key]

    def best_fit(self, size: int) -> _Block | None:
        """The smallest free block of at least `size` bytes, lowest address first (`get_free_block`)."""
        i = bisect.bisect_left(self._keys, (size, -1))
        return self._blocks[self._keys[i]] if i < len(self._keys) else None


class CachingAllocatorSim:
    """PyTorch's native CUDA caching allocator at default settings on one stream of an unlimited device."""

    def __init__(self) -> None:
        self._pools = {True: _FreePool(), False: _FreePool()}
        self._live: dict[int, _Block] = {}
        self._next_handle = NULL_HANDLE + 1
        self._next_addr = 0
        self._allocated = 0
        self._reserved = 0
        self._peak_allocated = 0
        self._peak_reserved = 0
        self._segments: list[tuple[int, int]] = []
        self.num_mallocs = 0

    @property
    def allocated(self) -> int:
        """Bytes in blocks handed out (the `allocated_bytes` stat: whole blocks, unsplit remainders included)."""
        return self._allocated

    @property
    def reserved(self) -> int:
        """Bytes in segments obtained from `cudaMalloc` (the `reserved_bytes` stat)."""
        return self._reserved

    @property
    def peak_allocated(self) -> int:
        """Highest `allocated` since creation or `reset_peak()`."""
        return self._peak_allocated

    @property
    def peak_reserved(self) -> int:
        """Highest `reserved` since creation or `reset_peak()`."""
        return self._peak_reserved

    @property
    def num_segments(self) -> int:
        """Number of `cudaMalloc` calls (segments) so far; none is ever released."""
        return len(self._segments)

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(address, size) of every segment, in allocation order."""
        return list(self._segments)

    def layout(self) -> list[tuple[int, int, bool]]:
        """(address, size, allocated) of every block, allocated or cached, by address."""
        blocks = [*self._live.values(), *self._pools[True].blocks(), *self._pools[False].blocks()]
        return sorted((b.addr, b.size, b.allocated) for b in blocks)

    @property
    def free_blocks(self) -> int:
        """Number of cached free blocks in both pools."""
        return len(self._pools[True]) + len(self._pools[False])

    def reset_peak(self) -> None:
        """Start new peak windows at the current values (`resetPeakStats`)."""
        self._peak_allocated, self._peak_reserved = self._allocated, self._reserved

    def block(self, handle: int) -> tuple[int, int]:
        """(address, size) of the live block behind `handle`."""
        b = self._live[handle]
        return b.addr, b.size

    def malloc(self, nbytes: int) -> int:
        """Allocate `nbytes` (`malloc`); returns a handle for `free`, `NULL_HANDLE` for 0 bytes."""
        if nbytes < 0:
            raise ValueError(f"negative allocation size {nbytes}")
        if nbytes == 0:
            return NULL_HANDLE
        size = round_size(nbytes)
        small = size <= K_SMALL_SIZE
        pool = self._pools[small]
        block = pool.best_fit(size)
        if block is not None:
            pool.remove(block)
        else:
            block = _Block(self._next_addr, segment_size(size), small)
            self._next_addr += block.size
            self._reserved += block.size
            self._peak_reserved = max(self._peak_reserved, self._reserved)
            self._segments.append((block.addr, block.size))
        remaining = block.size - size
        if (remaining >= K_MIN_BLOCK_SIZE) if small else (remaining > K_SMALL_SIZE):
            head = _Block(block.addr, size, small)
            head.prev, head.next = block.prev, block
            if block.prev is not None:
                block.prev.next = head
            block.prev = head
            block.addr += size
            block.size = remaining
            pool.add(block)
            block = head
        block.allocated = True
        handle = self._next_handle
        self._next_handle += 1
        self._live[handle] = block
        self._allocated += block.size
        self._peak_allocated = max(self._peak_allocated, self._allocated)
        self.num_mallocs += 1
        return handle

    def free(self, handle: int) -> None:
        """Return a block to its pool, merged with its free neighbours (`free_block`, `try_merge_blocks`)."""
        if handle == NULL_HANDLE:
            return
        block = self._live.pop(handle)
        block.allocated = False
        self._allocated -= block.size
        pool = self._pools[block.small]
        prev, nxt = block.prev, block.next
        if prev is not None and not prev.allocated:
            pool.remove(prev)
            block.addr, block.size, block.prev = prev.addr, block.size + prev.size, prev.prev
            if block.prev is not None:
                block.prev.next = block
        if nxt is not None and not nxt.allocated:
            pool.remove(nxt)
            block.size, block.next = block.size + nxt.size, nxt.next
            if block.next is not None:
                block.next.prev = block
        pool.add(block)

    def replay(self, events: Iterable[Event], handles: dict[int, int] | None = None) -> dict[int, int]:
        """Apply ("malloc", serial, nbytes) / ("free", serial, 0) events; returns serial -> handle of the live ones."""
        live = {} if handles is None else handles
        for kind, serial, nbytes in events:
            if kind == "malloc":
                live[serial] = self.malloc(nbytes)
            elif serial in live:
                self.free(live.pop(serial))
        return live


def transient_events(events: list[Event], start: int, stop: int) -> list[Event]:
    """The events of `events[start:stop]` whose allocation is made and freed inside that window, in order."""
    window = events[start:stop]
    made = {serial for kind, serial, _ in window if kind == "malloc"}
    freed = {serial for kind, serial, _ in window if kind == "free"}
    keep = made & freed
    return [e for e in window if e[1] in keep]


def device_memory_mb(reserved_bytes: int | None, gpu: str | None) -> tuple[float | None, str | None]:
    """(device-level MiB = reserved + the measured CUDA context of `gpu`, None) or (None, why it is not available)."""
    if reserved_bytes is None:
        return None, "no reserved estimate (target is not cuda): no CUDA caching allocator or CUDA context"
    if gpu is None:
        return None, (
            "CUDA context size not available: it is per GPU and taken only from `petlbench validate` measurements "
            "committed under results/reference/ (CUDA_CONTEXT_MB in petlbench/profiling/allocator.py"
            + (", none yet" if not CUDA_CONTEXT_MB else "")
            + "); no target GPU named"
        )
    if gpu not in CUDA_CONTEXT_MB:
        return None, (
            f"no measured CUDA context size for {gpu!r} in CUDA_CONTEXT_MB (petlbench/profiling/allocator.py); "
            "entries come only from `petlbench validate` output committed under results/reference/"
        )
    return reserved_bytes / MIB + CUDA_CONTEXT_MB[gpu], None
