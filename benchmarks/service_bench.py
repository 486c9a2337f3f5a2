"""Server overhead: jobs/s and added latency per job vs calling the engine directly, on the tiny model.

The engine call is the floor; the difference is what the service adds (validation, SQLite rows, queue hand-off,
PNG write with fsync, HTTP). A real server on loopback (uvicorn in a thread), clients in threads.
Usage: python benchmarks/service_bench.py [--jobs 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

JOB = {"prompt": "a red fox", "seed": 1, "steps": 4, "width": 64, "height": 64, "cfg": 1.0}


@contextmanager
def serving(engine, home: Path):
    from qwenstudio.config import Settings
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.engine_client import InProcessEngineClient
    from qwenstudio.testing.serving import run_app

    client = InProcessEngineClient.from_engine(engine)
    client.wait_ready(60)
    app = create_app(Settings(home=home), client, ServiceConfig(queue_size=256))
    try:
        with run_app(app) as url:
            yield url
    finally:
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args()
    import httpx

    from qwenstudio import Engine
    from qwenstudio.config import Settings

    home = Path(tempfile.mkdtemp(prefix="qs-svc-bench-"))
    engine = Engine.load("tiny", device="cpu", settings=Settings(home=home / "engine"))
    engine.generate(**JOB)
    report = {"http": {}}

    with serving(engine, home / "svc") as url:
        # Single client: alternate direct and HTTP calls so machine noise hits both alike.
        direct, via_http = [], []
        with httpx.Client(base_url=url, timeout=120) as http:
            http.post("/api/jobs?wait=true", json=JOB).raise_for_status()
            for _ in range(args.jobs):
                t = time.perf_counter()
                engine.generate(**JOB)
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                http.post("/api/jobs?wait=true", json=JOB).raise_for_status()
                via_http.append(time.perf_counter() - t)
        report["direct_engine_median_s"] = statistics.median(direct)
        report["http"][1] = {"jobs_per_s": 1 / statistics.median(via_http),
                             "median_latency_s": statistics.median(via_http)}
        for concurrency in (4, 8):
            latencies: list[float] = []

            def one(_):
                with httpx.Client(base_url=url, timeout=120) as http:
                    t = time.perf_counter()
                    r = http.post("/api/jobs?wait=true", json=JOB)
                    r.raise_for_status()
                    assert r.json()["status"] == "done", r.text
                    latencies.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(one, range(args.jobs)))
            wall = time.perf_counter() - t0
            report["http"][concurrency] = {"jobs_per_s": args.jobs / wall, "median_latency_s": statistics.median(latencies)}

    base = report["direct_engine_median_s"]
    print(f"direct engine call: median {base * 1e3:.1f} ms ({1 / base:.1f} jobs/s ceiling, one worker)")
    print(f"{'clients':>8} {'jobs/s':>8} {'median latency ms':>18} {'added vs direct ms':>19}")
    for c, row in report["http"].items():
        print(f"{c:>8} {row['jobs_per_s']:8.1f} {row['median_latency_s'] * 1e3:18.1f}"
              f" {(row['median_latency_s'] - base) * 1e3 if c == 1 else float('nan'):19.1f}")
    report["added_latency_single_client_s"] = report["http"][1]["median_latency_s"] - base
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
