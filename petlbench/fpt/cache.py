"""On-disk cache of preloaded LPM features for FPT/FPT+ (paper §3.6).

Layout: one folder per cache under `<cache_dir>/fpt_features/`, named
`<backbone>-<res>px-<key>` where `key` hashes everything the features depend on (`CacheSpec.config`:
backbone name, weights label and a digest of the LPM weights, resolution, layers, feature kind,
token ratio, importance mode, normalisation, storage dtype, and the image set's fingerprint)::

    vit_base_patch16_224-512px-3f2a.../
        manifest.json    written last: config, key, image count, and for every file its shape,
                         dtype, byte size and sha256
        index.json       sample ids in row order (row i of every array belongs to index[i])
        keys.npy         [images, L, H, n, d] in the cache dtype (float16 by default), memory-mapped
        values.npy       [images, L, H, n, d]
        indices.npy      [images, L, H, n] int32, the selected token positions (absent with all tokens)
        tokens.npy       [images, L, n, D] instead of keys/values for the MLP-fusion ablation

Crash safety: a cache is built in a hidden temporary sibling folder while holding an exclusive lock,
every file is fsynced, the manifest is written last, and the folder is renamed into place. A folder
without a manifest, with a manifest for another configuration, or with a data file of the wrong size
(truncated) is rejected, removed and rebuilt.

Content verification: the manifest holds every file's sha256, written at build time. By default
(`verify="first-open"`) a process re-hashes every file the first time it opens a cache, and again whenever a file's
size, modification time or inode changed since; a file overwritten in place with other bytes of the same size is
caught there. `verify="checksum"` re-hashes on every open, `verify="size"` only checks sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from petlbench.core.atomic import file_lock, write_json_atomic

if TYPE_CHECKING:
    from petlbench.data.source import Sample

CACHE_FORMAT = 1
CACHE_SUBDIR = "fpt_features"
MANIFEST, INDEX = "manifest.json", "index.json"
BATCH_PREFIX = "lpm_"  # batch keys of preloaded features: lpm_keys, lpm_values, lpm_indices, lpm_tokens
Verify = Literal["first-open", "size", "checksum"]

# (path, size, mtime_ns, inode) of every file this process has checksummed against its manifest.
_VERIFIED: set[tuple[str, int, int, int]] = set()


def _file_state(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


Log = Callable[[str], None]


class CacheError(RuntimeError):
    """A cache folder that cannot be used (missing, stale, truncated or corrupt)."""


@dataclass(frozen=True)
class CacheSpec:
    """What a cache must contain: its identifying config and the per-image shape/kind of every array."""

    config: dict[str, Any]
    arrays: dict[str, tuple[tuple[int, ...], str]]  # name -> (per-image shape, "float" | "index")
    sample_ids: tuple[str, ...]
    dtype: str = "float16"
    label: str = "cache"

    @property
    def key(self) -> str:
        """Hash of config, array layout and the ordered sample ids."""
        payload = json.dumps(
            {"config": self.config, "arrays": self._array_table(), "samples": list(self.sample_ids)},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        """`<label>-<key>` with the label made filesystem-safe."""
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.label)}-{self.key}"

    def array_dtype(self, name: str) -> np.dtype:
        """Storage dtype of one array: the cache dtype for features, int32 for token indices."""
        return np.dtype(np.int32) if self.arrays[name][1] == "index" else np.dtype(self.dtype)

    def array_shape(self, name: str) -> tuple[int, ...]:
        """Full on-disk shape `[images, *per_image]` of one array."""
        return (len(self.sample_ids), *self.arrays[name][0])

    def _array_table(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"shape": list(self.array_shape(name)), "dtype": self.array_dtype(name).name}
            for name in sorted(self.arrays)
        }


@dataclass
class FeatureStore:
    """Read side of a valid cache: memory-mapped arrays opened lazily in each process (DataLoader workers)."""

    path: Path
    sample_ids: tuple[str, ...]
    arrays: dict[str, tuple[tuple[int, ...], str]]  # name -> (full shape, dtype name)
    nbytes: int
    _opened: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _pid: int = field(default=-1, repr=False)
    _rows: dict[str, int] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_opened"], state["_pid"] = {}, -1  # never pickle a memmap (it would copy the data)
        return state

    def row(self, sample_id: str) -> int:
        """Row of a sample in every array."""
        if not self._rows:
            self._rows = {sid: i for i, sid in enumerate(self.sample_ids)}
        try:
            return self._rows[sample_id]
        except KeyError:
            raise CacheError(f"sample {sample_id} is not in the feature cache {self.path}") from None

    def array(self, name: str) -> np.ndarray:
        """The memory-mapped array `name` (opened read-only on first use in this process)."""
        if self._pid != os.getpid():
            self._opened, self._pid = {}, os.getpid()
        if name not in self._opened:
            self._opened[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._opened[name]

    def read(self, row: int) -> dict[str, np.ndarray]:
        """Every array's record for one row (copied out of the map)."""
        return {name: np.array(self.array(name)[row]) for name in self.arrays}


def samples_fingerprint(samples: Iterable[Sample]) -> str:
    """Content identity of an image set: sample ids, file sizes and modification times (order-free)."""
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: s.sample_id):
        stat = Path(sample.path).stat()
        digest.update(f"{sample.sample_id}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names, shapes, dtypes, bytes): identifies the exact weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_bytes(path: Path) -> int:
    """Total size of the regular files directly inside `path`."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def open_cache(path: Path, spec: CacheSpec, verify: Verify = "first-open") -> FeatureStore:
    """Validate the cache folder `path` against `spec` and open it; raises CacheError saying why not."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CacheError("no manifest (the build never finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CacheError(f"unreadable manifest ({err})") from None
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"cache format {manifest.get('format')} != {CACHE_FORMAT}")
    if manifest.get("config") != spec.config or manifest.get("key") != spec.key:
        diff = sorted(
            k
            for k in set(spec.config) | set(manifest.get("config") or {})
            if (manifest.get("config") or {}).get(k) != spec.config.get(k)
        )
        raise CacheError(f"built for another configuration (differs in: {', '.join(diff) or 'layout'})")
    files = dict(manifest.get("files", {}))
    expected_arrays = spec._array_table()
    if set(manifest.get("arrays", {})) != set(expected_arrays):
        raise CacheError("array set differs from the requested one")
    for name, entry in expected_arrays.items():
        stored = manifest["arrays"][name]
        if stored["shape"] != entry["shape"] or stored["dtype"] != entry["dtype"]:
            raise CacheError(f"{name}: stored {stored['shape']} {stored['dtype']}, expected {entry}")
    for filename, entry in files.items():
        file_path = path / filename
        if not file_path.is_file():
            raise CacheError(f"{filename} is missing")
        size = file_path.stat().st_size
        if size != entry["bytes"]:
            raise CacheError(f"{filename} has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        state = _file_state(file_path)
        if verify == "checksum" or (verify == "first-open" and state not in _VERIFIED):
            if _sha256_file(file_path) != entry["sha256"]:
                raise CacheError(f"{filename} does not match its checksum")
            _VERIFIED.add(state)
    sample_ids = tuple(json.loads((path / INDEX).read_text()))
    if sample_ids != spec.sample_ids:
        raise CacheError("index lists other samples")
    arrays: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, entry in expected_arrays.items():
        try:
            mapped = np.load(path / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise CacheError(f"{name}.npy cannot be mapped ({err})") from None
        if list(mapped.shape) != entry["shape"] or mapped.dtype.name != entry["dtype"]:
            raise CacheError(f"{name}.npy holds {mapped.shape} {mapped.dtype}, expected {entry}")
        arrays[name] = (tuple(entry["shape"]), entry["dtype"])
        del mapped
    return FeatureStore(path, sample_ids, arrays, nbytes=sum(e["bytes"] for e in files.values()))


Producer = Callable[[], Iterable[tuple[Sequence[str], Mapping[str, np.ndarray]]]]


def build_cache(path: Path, spec: CacheSpec, produce: Producer, log: Log) -> tuple[FeatureStore, float]:
    """Write the cache for `spec` at `path` crash-safely from `produce()` batches; returns (store, seconds).

    `produce()` yields (sample ids, {array name: [b, *per_image] array}) in any order and batch size.
    """
    started = time.perf_counter()
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rows = {sid: i for i, sid in enumerate(spec.sample_ids)}
        maps = {
            name: np.lib.format.open_memmap(
                tmp / f"{name}.npy", mode="w+", dtype=spec.array_dtype(name), shape=spec.array_shape(name)
            )
            for name in spec.arrays
        }
        written = np.zeros(len(rows), dtype=bool)
        for sample_ids, batch in produce():
            positions = np.array([rows[sid] for sid in sample_ids], dtype=np.int64)
            for name, target in maps.items():
                target[positions] = np.asarray(batch[name]).astype(target.dtype, copy=False)
            written[positions] = True
        if not written.all():
            raise CacheError(f"the producer skipped {int((~written).sum())} of {len(rows)} images")
        for target in maps.values():
            target.flush()
        del maps
        (tmp / INDEX).write_text(json.dumps(list(spec.sample_ids)))
        files: dict[str, dict[str, Any]] = {}
        for file_path in sorted(tmp.iterdir()):
            _fsync_path(file_path)
            files[file_path.name] = {"bytes": file_path.stat().st_size, "sha256": _sha256_file(file_path)}
        hashed = [(name, _file_state(tmp / name)) for name in files]
        seconds = time.perf_counter() - started
        manifest = {
            "format": CACHE_FORMAT,
            "key": spec.key,
            "config": spec.config,
            "num_images": len(spec.sample_ids),
            "arrays": spec._array_table(),
            "files": files,
            "build_seconds": seconds,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(tmp / MANIFEST, manifest)  # last: its presence marks a complete build
        _fsync_path(tmp)
        os.rename(tmp, path)
        _fsync_path(path.parent)
        # just hashed while writing: the same files (same inode, size and time) need no second pass on open
        _VERIFIED.update((str((path / name).resolve()), *state[1:]) for name, state in hashed)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_cache(path, spec), seconds


def ensure_cache(
    cache_dir: Path, spec: CacheSpec, produce: Producer, log: Log, verify: Verify = "first-open"
) -> tuple[FeatureStore, dict[str, Any]]:
    """Open the valid cache for `spec` under `cache_dir`, or (re)build it; returns (store, preload info)."""
    root = Path(cache_dir) / CACHE_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    path = root / spec.folder_name()
    started = time.perf_counter()
    with file_lock(root / f".{path.name}.lock"):
        reason = "no cache yet"
        if path.exists():
            try:
                store = open_cache(path, spec, verify)
            except CacheError as err:
                reason = str(err)
                log(f"feature cache {path} rejected: {reason}; rebuilding")
            else:
                seconds = time.perf_counter() - started
                log(f"reusing preloaded features from {path} ({_human(store.nbytes)}, opened in {seconds:.1f}s)")
                return store, _info(path, store, reused=True, seconds=seconds)
        for leftover in root.glob(f".{path.name}.tmp-*"):  # builds killed half-way (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        if path.exists():
            shutil.rmtree(path)
        log(f"preloading LPM features into {path} ({reason})")
        store, seconds = build_cache(path, spec, produce, log)
    log(f"preloaded {len(spec.sample_ids)} images in {seconds:.1f}s: {_human(store.nbytes)} at {path}")
    return store, _info(path, store, reused=False, seconds=seconds)


def _info(path: Path, store: FeatureStore, reused: bool, seconds: float) -> dict[str, Any]:
    return {
        "cache_path": str(path),
        "cache_bytes": store.nbytes,
        "cache_reused": reused,
        "preload_seconds": seconds,
        "num_images": len(store.sample_ids),
    }


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


class PreloadedDataset(Dataset):
    """A view dataset (without the LPM view) whose items also carry the cached LPM features.

    Items gain `lpm_<name>` tensors (float features in the cache dtype, indices as int64); the model
    casts features to float32 on its device.
    """

    def __init__(self, base: Any, store: FeatureStore) -> None:
        self.base = base
        self.store = store
        self.rows = [store.row(sample.sample_id) for sample in base.samples]

    def __len__(self) -> int:
        return len(self.base)

    @property
    def samples(self) -> list[Any]:
        """The underlying samples (same order as the items)."""
        return self.base.samples

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from petlbench.data.views import split_key

        item = self.base[key]  # an (epoch, index) key reaches the augmented views unchanged
        _, index = split_key(key)
        for name, array in self.store.read(self.rows[index]).items():
            tensor = torch.from_numpy(array)
            item[BATCH_PREFIX + name] = tensor.long() if array.dtype == np.int32 else tensor
        return item
