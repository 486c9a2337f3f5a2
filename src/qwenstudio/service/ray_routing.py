"""Which replica runs a job: the model first (a load costs seconds to minutes), then the LoRA stack (a swap costs a
file read and a re-install), then a free replica over a busy one.

Ray Serve's own answer to "route to a replica that has this model" is model multiplexing: the client tags each call
with ``multiplexed_model_id`` and the replica loads through a ``serve.multiplexed`` function whose ids Serve's router
tracks. It knows model ids only, and the LoRA stack cannot join the id (a replica holding the model with other
LoRAs would then look like one without the model). So ``ModelLoraRouter`` is a ``RequestRouter`` (Serve's public
extension point, ``serve.request_router``) that keeps the multiplexing ranks and splits the first one by LoRA stack,
from what each replica reports in ``record_routing_stats`` (``{"loras": {model: stack key}}``, refreshed every
``ROUTING_STATS_PERIOD_S``, so a just-changed stack may be seen a moment late — a preference, never a correctness
matter: any replica runs any job). Ranks, each tried in turn, lowest queue first within a rank, a full replica
(its one job slot taken) skipped:

1. replicas holding the model with the same LoRA stack;
2. replicas holding the model with another stack;
3. replicas with the fewest models loaded (they load it, evicting nothing or the least used);
4. every other replica.

Trade-off: with every holder busy a job goes to a free replica at once and loads the model there (throughput first;
on real weights that load is what a queue wait would have to beat). It waits only when every replica is busy.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, MultiplexMixin, RequestRouter  # imported only with --ray

ROUTING_STATS_PERIOD_S = 1.0


def lora_stack_key(loras: Any) -> str:
    """One string per LoRA stack, order-insensitive (the branches add up): ``"name:weight,..."``, ``""`` for none."""
    parts = []
    for ref in loras or ():
        name = ref.get("name") if isinstance(ref, dict) else getattr(ref, "name", None)
        weight = ref.get("weight", 1.0) if isinstance(ref, dict) else getattr(ref, "weight", 1.0)
        parts.append(f"{name}:{float(weight):g}")
    return ",".join(sorted(parts))


def request_router_config():
    """The deployment's ``request_router_config``: ``ModelLoraRouter`` with stats every ROUTING_STATS_PERIOD_S."""
    from ray.serve.config import RequestRouterConfig

    return RequestRouterConfig(request_router_class=ModelLoraRouter,
                               request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
                               request_routing_stats_timeout_s=5.0)


class ModelLoraRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Multiplexing ranks with the holders of the model split by LoRA stack (see the module docstring)."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        model = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model:
            return [candidate_replicas]
        holders, fewest, rest = self.rank_replicas_via_multiplex(candidate_replicas, model)
        stack = pending_request.kwargs.get("lora_stack", "")
        same = [r for r in holders if ((r.routing_stats or {}).get("loras") or {}).get(model) == stack]
        other = [r for r in holders if r not in same]
        return [rank for rank in (same, other, fewest, rest) if rank]
