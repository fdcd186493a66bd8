"""What native libraries print on the process's stderr (file descriptor 2), with their known noise filtered out.

torch.profiler's kineto backend logs every profiler start and stop and, on a machine without a GPU, a failed CUDA
device count, straight to file descriptor 2: Python's `sys.stderr` never sees it, so only a descriptor-level
redirection can keep it off the user's console.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# kineto's log lines: "USDT:<date> <time> <pid>:<tid> SyncActivityProfilerHandler.cpp:39] profiler_start", ...
KINETO_NOISE = re.compile(
    r"^[A-Z]+:\S+ \S+ \d+:\d+ \S+\.cpp:\d+\] "
    r"(profiler_start|profiler_stop|Completed Stage: .*|gpuGetDeviceCount failed with code \d+)\s*$"
)


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[str] = KINETO_NOISE) -> Iterator[None]:
    """Capture file descriptor 2 while the block runs, then write back every line that `noise` does not match."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()  # Python's own writes in the block went to the capture too: they are kept below
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not noise.match(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
