"""Step cache: skip most of the DiT on steps where its output barely changes (first-block residual cache).

Adjacent denoising steps of a many-step run produce nearly the same residual through the stack of blocks. Each call
still runs block 0; when block 0's residual (output - input) has moved less than ``threshold`` (relative L1) since
the last fully computed step, blocks 1..N-1 are skipped and their residual is reused — extrapolated to this step
from the last two computed steps with a first-order Taylor term (TaylorSeer) when ``taylor=1``. The first
``warmup_steps`` steps always compute (the image's layout forms there) and at most ``max_skip`` steps in a row reuse.

How it hooks in: the transformer's ``transformer_blocks`` ModuleList gets a subclass whose iteration yields a wrapper
of block 0 and then either the remaining (possibly compiled) blocks or one "apply cached residual" step, so module
names, LoRA wrapping and regional compile are untouched; a forward pre-hook reads the timestep to tell steps apart.
Calls at the same timestep are the passes of one step (e.g. conditional and unconditional CFG): each has its own cache
slot and all follow the decision of the step's first call. A timestep that goes up starts a new run (state reset).
Nothing here knows the sampling loop, so the engine's loop (batched CFG or not) is unaffected. Off (never enabled, or
``disable_step_cache``) the model is exactly the stock module: bit-identical output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import InvalidRequest


@dataclass(frozen=True)
class StepCacheConfig:
    threshold: float = 0.08  # reuse when mean|r - r_prev| / mean|r_prev| of block 0's residual is below this
    warmup_steps: int = 4  # always compute these first steps
    max_skip: int = 3  # at most this many reused steps in a row
    taylor: int = 1  # 0: reuse the cached residual as is; 1: extrapolate it linearly in the step index

    def __post_init__(self):
        if not (0.0 < self.threshold < 1.0):
            raise InvalidRequest(f"step cache threshold must be in (0, 1), got {self.threshold}",
                                 code="invalid_cache")
        if self.warmup_steps < 1 or self.max_skip < 1 or self.taylor not in (0, 1):
            raise InvalidRequest("step cache: warmup_steps >= 1, max_skip >= 1, taylor 0 or 1", code="invalid_cache")

    def to_dict(self) -> dict:
        return {"kind": "first_block", **asdict(self)}


@dataclass
class _Slot:
    shape: tuple = ()
    first_residual: object = None  # block 0's residual at the last computed step
    history: list = field(default_factory=list)  # [(step, hidden_residual, text_residual)], last two computed


@dataclass
class StepCacheStats:
    calls: int = 0  # transformer forwards
    computed: int = 0  # forwards that ran every block
    reused: int = 0  # forwards that ran block 0 only

    def to_dict(self) -> dict:
        return asdict(self)


class StepCache:
    """The per-transformer state and decisions; ``stats`` counts calls since enabling (``reset_stats`` to zero)."""

    def __init__(self, config: StepCacheConfig, num_blocks: int):
        self.config = config
        self.num_blocks = num_blocks
        self.stats = StepCacheStats()
        self.reset()

    def reset(self) -> None:
        self.slots: dict[int, _Slot] = {}
        self.prev_t = None
        self.step = -1
        self.slot = 0
        self.reuse_step = False  # the decision of this step's first call
        self.in_a_row = 0
        self.reuse_now = False  # the decision for the call in flight
        self.inputs = None  # (hidden, text) entering block 1 of the call in flight

    def reset_stats(self) -> None:
        self.stats = StepCacheStats()

    def begin_call(self, timestep: float) -> None:
        if self.prev_t is None or timestep > self.prev_t:
            self.reset()
            self.step, self.slot = 0, 0
        elif timestep < self.prev_t:
            self.step, self.slot = self.step + 1, 0
        else:
            self.slot += 1
        self.prev_t = timestep
        self.stats.calls += 1

    def after_first_block(self, hidden_in, hidden_out, text_out) -> None:
        """Decide for this call from block 0's residual."""
        slot = self.slots.setdefault(self.slot, _Slot())
        shape = (tuple(hidden_out.shape), tuple(text_out.shape))
        if shape != slot.shape:
            slot.shape, slot.first_residual, slot.history = shape, None, []
        residual = hidden_out - hidden_in
        usable = (slot.first_residual is not None and len(slot.history) > 0 and self.num_blocks > 1
                  and self.step >= self.config.warmup_steps)
        if self.slot == 0:
            reuse = False
            if usable and self.in_a_row < self.config.max_skip:
                prev = slot.first_residual
                change = (residual - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)
                reuse = bool(change < self.config.threshold)  # the one host sync the cache adds per step
            self.reuse_step = reuse
            self.in_a_row = self.in_a_row + 1 if reuse else 0
            self.reuse_now = reuse
        else:
            self.reuse_now = self.reuse_step and usable
        if not self.reuse_now:
            slot.first_residual = residual

    def predicted(self):
        """The residual of blocks 1..N-1 for this step: the last computed one, Taylor-extrapolated if asked."""
        slot = self.slots[self.slot]
        k1, h1, t1 = slot.history[-1]
        if self.config.taylor and len(slot.history) > 1:
            k0, h0, t0 = slot.history[-2]
            a = (self.step - k1) / (k1 - k0)
            return h1 + (h1 - h0) * a, t1 + (t1 - t0) * a
        return h1, t1

    def store(self, hidden_residual, text_residual) -> None:
        slot = self.slots[self.slot]
        slot.history = (slot.history + [(self.step, hidden_residual, text_residual)])[-2:]

    def end_call(self) -> None:
        if self.reuse_now:
            self.stats.reused += 1
        else:
            self.stats.computed += 1


def _make_block_list_class():
    """The ModuleList subclass (built lazily: no torch import at module import)."""
    from torch import nn

    class CachedBlockList(nn.ModuleList):
        """``transformer_blocks`` with the step cache in its iteration (see the module docstring)."""

        def __iter__(self):
            cache: StepCache | None = self.__dict__.get("step_cache")
            blocks = list(self._modules.values())
            if cache is None:  # a slice of the list (``blocks[1:]``) is a plain list of blocks
                yield from blocks
                return
            yield _FirstBlock(blocks[0], cache)
            if cache.reuse_now:
                yield _ApplyCached(cache)
                return
            for i, block in enumerate(blocks[1:], start=1):
                yield _Recording(block, cache, first=i == 1, last=i == len(blocks) - 1)

    return CachedBlockList


class _FirstBlock:
    def __init__(self, block, cache: StepCache):
        self.block, self.cache = block, cache

    def __call__(self, *, hidden_states, **kw):
        text, hidden = self.block(hidden_states=hidden_states, **kw)
        self.cache.after_first_block(hidden_states, hidden, text)
        return text, hidden


class _ApplyCached:
    """Stands in for blocks 1..N-1 on a reused step: adds their predicted residual."""

    def __init__(self, cache: StepCache):
        self.cache = cache

    def __call__(self, *, hidden_states, encoder_hidden_states, **kw):
        dh, dt = self.cache.predicted()
        return encoder_hidden_states + dt, hidden_states + dh


class _Recording:
    """A computed block; the first records the inputs, the last stores the residual of blocks 1..N-1."""

    def __init__(self, block, cache: StepCache, first: bool, last: bool):
        self.block, self.cache, self.first, self.last = block, cache, first, last

    def __call__(self, *, hidden_states, encoder_hidden_states, **kw):
        if self.first:
            self.cache.inputs = (hidden_states, encoder_hidden_states)
        text, hidden = self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **kw)
        if self.last:
            h0, t0 = self.cache.inputs
            self.cache.store(hidden - h0, text - t0)
            self.cache.inputs = None
        return text, hidden


def enable_step_cache(transformer, config: StepCacheConfig) -> StepCache:
    """Turn the step cache on for ``transformer`` (a ``QwenImageTransformer2DModel``) in place; returns its state.
    Enabling again replaces the config and resets the state."""
    if getattr(transformer, "step_cache", None) is not None:
        disable_step_cache(transformer)
    blocks = transformer.transformer_blocks
    cache = StepCache(config, len(blocks))

    def pre_hook(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[3]  # forward(hidden, text, mask, timestep, ...)
        cache.begin_call(float(t.reshape(-1)[0]))

    def post_hook(module, args, kwargs, output):
        cache.end_call()

    handles = (transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
               transformer.register_forward_hook(post_hook, with_kwargs=True))
    blocks.step_cache = cache
    blocks.__class__ = _make_block_list_class()
    transformer.step_cache = cache
    cache.handles = handles
    return cache


def disable_step_cache(transformer) -> None:
    """Back to the stock module (bit-identical forward)."""
    from torch import nn

    cache = getattr(transformer, "step_cache", None)
    if cache is None:
        return
    for h in cache.handles:
        h.remove()
    blocks = transformer.transformer_blocks
    blocks.__class__ = nn.ModuleList
    del blocks.step_cache
    transformer.step_cache = None


def parse_cache(value) -> StepCacheConfig | None:
    """CLI/API forms: None/"off"/0 -> off; a threshold number (or its string) -> defaults with that threshold;
    a dict -> the config's fields; a config -> itself."""
    if value is None or value is False or value in ("off", "", "0", 0):
        return None
    if isinstance(value, StepCacheConfig):
        return value
    if isinstance(value, dict):
        allowed = set(StepCacheConfig.__dataclass_fields__)
        unknown = set(value) - allowed - {"kind"}
        if unknown:
            raise InvalidRequest(f"unknown step cache setting(s): {', '.join(sorted(unknown))}", code="invalid_cache")
        return StepCacheConfig(**{k: v for k, v in value.items() if k in allowed})
    if value is True or value == "on":
        return StepCacheConfig()
    try:
        return StepCacheConfig(threshold=float(value))
    except (TypeError, ValueError):
        raise InvalidRequest(f"step cache: give a threshold like 0.08 (or 'off'), got '{value}'",
                             code="invalid_cache") from None
