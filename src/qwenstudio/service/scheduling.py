"""Which queued job a worker takes next when it serves several models: model affinity with bounded unfairness.

Switching models costs a load (seconds to minutes on real weights), so a worker prefers queued jobs for a model it
has loaded over an older job for another one. The bound: the oldest waiting job of another model is passed over by
at most ``max_consecutive`` jobs in a row, and not at all once it has waited ``max_wait_s``; then the worker takes
the oldest job (first in, first out) and switches. With nothing loaded, or when the oldest job is for a loaded
model, it is plain FIFO. The choice only orders claims: ``Store.claim_next`` stays the one atomic claim, so a race
with another worker can change which job is taken, never run one twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelAffinity:
    max_consecutive: int = 4  # K: jobs that may jump ahead of an older job for another model, in a row
    max_wait_s: float = 30.0  # T: an older job that waited this long is taken next, whatever is loaded
    streak: int = 0  # how many jobs jumped the queue since the oldest one was last taken

    def claim(self, store: Any, worker_id: str | None, served: list[str], resident: list[str],
              lease_s: float | None = None) -> dict | None:
        """Claim the next job for ``served`` models, preferring ``resident`` ones within the bound."""
        resident = [m for m in resident if m in served]
        if resident and self.streak < self.max_consecutive:
            oldest = store.oldest_queued(served)
            if oldest is None:
                return None
            waited = time.time() - float(oldest["created_at"])
            if oldest["model"] not in resident and waited < self.max_wait_s:
                row = store.claim_next(worker_id, resident, lease_s=lease_s)
                if row is not None:
                    self.streak += 1
                    return row
        row = store.claim_next(worker_id, served, lease_s=lease_s)
        if row is not None:
            self.streak = 0
        return row
