"""Prometheus text exposition written by hand (format 0.0.4): counters, gauges and one latency histogram.
Counters live on one ``Metrics`` object per app; nothing global."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submitted = 0
        self.finished: Counter[str] = Counter()  # by status
        self.failures: Counter[str] = Counter()  # by error code
        self.rejected: Counter[str] = Counter()  # by reason, before queueing
        self.steps = 0
        self.step_seconds = 0.0
        self.last_steps_per_s = 0.0
        self._bucket_counts = [0] * len(LATENCY_BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0

    def job_submitted(self) -> None:
        with self._lock:
            self.submitted += 1

    def job_rejected(self, code: str) -> None:
        with self._lock:
            self.rejected[code] += 1

    def job_finished(self, status: str, seconds: float, *, code: str | None = None, steps: int = 0,
                     step_seconds: float = 0.0) -> None:
        with self._lock:
            self.finished[status] += 1
            if code:
                self.failures[code] += 1
            self.steps += steps
            self.step_seconds += step_seconds
            if steps and step_seconds > 0:
                self.last_steps_per_s = steps / step_seconds
            self._latency_sum += seconds
            self._latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self._bucket_counts[i] += 1

    def render(self, *, queue_depth: int, running: int, ready: bool) -> str:
        with self._lock:
            lines = [
                "# HELP qwenstudio_ready 1 when the model is loaded and the worker takes jobs.",
                "# TYPE qwenstudio_ready gauge",
                f"qwenstudio_ready {int(ready)}",
                "# HELP qwenstudio_queue_depth Jobs waiting in the queue (not counting the running one).",
                "# TYPE qwenstudio_queue_depth gauge",
                f"qwenstudio_queue_depth {queue_depth}",
                "# HELP qwenstudio_jobs_running Jobs running now.",
                "# TYPE qwenstudio_jobs_running gauge",
                f"qwenstudio_jobs_running {running}",
                "# HELP qwenstudio_jobs_submitted_total Jobs accepted into the queue.",
                "# TYPE qwenstudio_jobs_submitted_total counter",
                f"qwenstudio_jobs_submitted_total {self.submitted}",
                "# HELP qwenstudio_jobs_finished_total Jobs finished, by final status.",
                "# TYPE qwenstudio_jobs_finished_total counter",
            ]
            for status in ("done", "failed", "cancelled"):
                lines.append(f'qwenstudio_jobs_finished_total{{status="{status}"}} {self.finished[status]}')
            lines += ["# HELP qwenstudio_job_failures_total Failed jobs by error code.",
                      "# TYPE qwenstudio_job_failures_total counter"]
            lines += [f'qwenstudio_job_failures_total{{code="{_esc(c)}"}} {n}' for c, n in sorted(self.failures.items())]
            lines += ["# HELP qwenstudio_requests_rejected_total Requests refused before queueing, by code.",
                      "# TYPE qwenstudio_requests_rejected_total counter"]
            lines += [f'qwenstudio_requests_rejected_total{{code="{_esc(c)}"}} {n}'
                      for c, n in sorted(self.rejected.items())]
            lines += [
                "# HELP qwenstudio_steps_total Denoising steps run.",
                "# TYPE qwenstudio_steps_total counter",
                f"qwenstudio_steps_total {self.steps}",
                "# HELP qwenstudio_step_seconds_total Seconds spent in denoising steps.",
                "# TYPE qwenstudio_step_seconds_total counter",
                f"qwenstudio_step_seconds_total {self.step_seconds:.6f}",
                "# HELP qwenstudio_steps_per_second Denoising speed of the last finished job.",
                "# TYPE qwenstudio_steps_per_second gauge",
                f"qwenstudio_steps_per_second {self.last_steps_per_s:.4f}",
                "# HELP qwenstudio_job_duration_seconds Run time of finished jobs (start to end).",
                "# TYPE qwenstudio_job_duration_seconds histogram",
            ]
            for bound, n in zip(LATENCY_BUCKETS, self._bucket_counts):
                lines.append(f'qwenstudio_job_duration_seconds_bucket{{le="{bound}"}} {n}')
            lines += [
                f'qwenstudio_job_duration_seconds_bucket{{le="+Inf"}} {self._latency_count}',
                f"qwenstudio_job_duration_seconds_sum {self._latency_sum:.6f}",
                f"qwenstudio_job_duration_seconds_count {self._latency_count}",
            ]
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
