"""Jobs/s of the service on Ray Serve with one vs two engine replicas, on the tiny model (``serve --ray --replicas N``).

The path a user takes: a real server on loopback (uvicorn in a thread) whose client is ``RayServeEngineClient``,
one job worker per replica (ServiceConfig.workers), all jobs submitted at once over HTTP, the clock running from the
first submit to the last job done (its PNG written). Replicas are CPU replicas (one CPU slot each, OMP threads 1)
on a local Ray; each count gets a fresh deployment, then warm-up rounds until every replica holds the model (one
long job per replica at once, so each worker is busy long enough for the others to claim theirs and the router to
send them to the replicas without the model; checked on the replicas' board). Without that, a replica's first load
(seconds, cold) lands inside the timed window: with tiny jobs that alone made 2 replicas look 4-5x slower than 1.
Parallel replicas can only gain what idle cores allow: the report prints the CPU count and the load average.
Usage: OMP_NUM_THREADS=1 python benchmarks/ray_replicas.py [--jobs 16] [--replicas 1 2] [--cpus 1 1] [--steps 8]
       [--size 128]   (--cpus 2 1: one 2-thread replica vs two 1-thread ones, the same CPU budget)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def run_count(models: Path, home: Path, replicas: int, jobs: int, job: dict, cpus: int = 1) -> dict:
    import httpx

    from qwenstudio.config import Settings
    from qwenstudio.engine.acceleration import speed_options
    from qwenstudio.service.app import create_app
    from qwenstudio.service.config import ServiceConfig
    from qwenstudio.service.model_pool import LoadOptions, ModelCatalog
    from qwenstudio.service.ray_client import RayServeEngineClient
    from qwenstudio.testing.serving import run_app

    settings = Settings(home=home / f"r{replicas}", models_dirs=(models,), device="cpu")
    catalog = ModelCatalog(settings, "tiny-a", LoadOptions(device="cpu", speed=speed_options(compile="off")))
    started = time.monotonic()
    client = RayServeEngineClient(catalog, num_replicas=replicas, num_cpus=cpus, app_name=f"bench{replicas}x{cpus}",
                                  ray_actor_options={"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cpus)}}})
    try:
        assert client.wait_ready(300), client.load_error
        deploy_s = time.monotonic() - started
        app = create_app(settings, client, ServiceConfig(queue_size=max(64, jobs), workers=replicas))
        with run_app(app) as url, httpx.Client(base_url=url, timeout=300) as http:
            warm_rounds = warm_every_replica(http, client, job, replicas)
            t0 = time.perf_counter()
            ids = [http.post("/api/jobs", json={**job, "seed": i}).json()["id"] for i in range(jobs)]
            statuses = wait_all(http, ids)
            wall = time.perf_counter() - t0
        states = client.replica_info()
        per_replica = {name[-8:]: sum(1 for j in s["completed"] if j in set(ids)) for name, s in states.items()}
        return {"replicas": replicas, "cpus_per_replica": cpus, "jobs": jobs, "done": statuses.count("done"), "wall_s": round(wall, 3),
                "jobs_per_s": round(jobs / wall, 3), "deploy_s": round(deploy_s, 1), "jobs_per_replica": per_replica,
                "warm_rounds": warm_rounds}
    finally:
        client.close()


WARM_STEPS = 48  # a warm-up job this long keeps its replica busy while the other workers claim theirs
WARM_ROUNDS = 4


def holding(client, model: str) -> int:
    return sum(1 for s in client.replica_info().values() if s.get("alive") and model in s.get("models", []))


def warm_every_replica(http, client, job: dict, replicas: int, model: str = "tiny-a") -> int:
    """Rounds of ``replicas`` long jobs at once until every replica holds ``model``; returns the rounds it took
    (an error when it never gets there: the timed run would include a load)."""
    for rounds in range(1, WARM_ROUNDS + 1):
        warm = [http.post("/api/jobs", json={**job, "steps": WARM_STEPS, "seed": 1000 + i}).json()["id"]
                for i in range(replicas)]
        wait_all(http, warm)
        if holding(client, model) >= replicas:
            return rounds
    raise RuntimeError(f"only {holding(client, model)} of {replicas} replicas loaded {model} after {WARM_ROUNDS} "
                       "warm-up rounds")


def wait_all(http, ids: list[str]) -> list[str]:
    out = []
    for job_id in ids:
        while True:
            status = http.get(f"/api/jobs/{job_id}").json()["status"]
            if status in ("done", "failed", "cancelled"):
                out.append(status)
                break
            time.sleep(0.01)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpus", type=int, nargs="+", default=None, help="CPU slots (= torch threads) per replica, one "
                    "per --replicas entry (default 1 each; e.g. --replicas 1 2 --cpus 2 1: the same CPU budget)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    import ray

    from qwenstudio.testing.tiny import TinySpec, write_diffusers_folder

    root = Path(tempfile.mkdtemp(prefix="qs-ray-bench-"))
    write_diffusers_folder(root / "models" / "tiny-a", TinySpec(seed=0))
    os.environ.setdefault("HF_HUB_CACHE", str(root / "hf-empty"))  # the replicas see only the bench's model
    job = {"prompt": "a red fox", "steps": args.steps, "width": args.size, "height": args.size}
    cpus = args.cpus or [1] * len(args.replicas)
    ray.init(num_cpus=max(n * c for n, c in zip(args.replicas, cpus)), include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024)
    try:
        rows = [run_count(root / "models", root / "home", n, args.jobs, job, c) for n, c in zip(args.replicas, cpus)]
    finally:
        ray.shutdown()
    base = rows[0]["jobs_per_s"]
    report = {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "job": job,
              "omp_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows}
    print(f"tiny model, {job['width']}x{job['height']}, {job['steps']} steps, {args.jobs} jobs; "
          f"{report['cpus']} CPUs, load average {report['loadavg_1m']} (1 min, at the end)")
    print("| replicas | CPU slots (threads) each | jobs/s | vs first | wall s | jobs per replica | warm-up rounds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['replicas']} | {r['cpus_per_replica']} | {r['jobs_per_s']:.2f} | {r['jobs_per_s'] / base:.2f}x | "
              f"{r['wall_s']:.2f} | "
              f"{', '.join(str(v) for v in r['jobs_per_replica'].values())} | {r['warm_rounds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
