"""Prompt encoding exactly as the reference pipeline, plus an LRU cache of embeddings.

The reference formats the prompt into the variant's chat template, runs Qwen2.5-VL, takes the last hidden state and
drops the template's first ``drop_tokens`` positions. We call the language model's decoder directly (not the
``...ForConditionalGeneration`` head) so the vocab-sized LM head — about 1 TFLOP per 1k-token prompt on the real
model — is never computed. Prompts over the model's token limit are refused rather than silently truncated.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import InvalidRequest


@dataclass(frozen=True)
class PromptEmbedding:
    embeds: object  # Tensor [1, L, D] on the engine device, model dtype
    tokens: int  # L, the number of tokens after dropping the template prefix


class PromptEncoder:
    """Text-only prompts (text-to-image). ``VisionPromptEncoder`` (edit variants) extends it with input images."""

    def __init__(self, tokenizer, text_encoder, *, template: str, drop_tokens: int, max_tokens: int, cache_size=64,
                 tokenizer_lock=None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.template = template
        self.drop_tokens = drop_tokens
        self.max_tokens = max_tokens
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()
        # Fast tokenizers are not safe to call from two threads at once ("Already borrowed"): the server checks
        # prompts on request threads while the worker encodes. Encoders sharing a tokenizer share this lock.
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self.hits = 0
        self.misses = 0

    def tokenize(self, texts, **kwargs):
        with self.tokenizer_lock:
            return self.tokenizer(texts, **kwargs)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenize(self.template.format(prompt)).input_ids) - self.drop_tokens

    def check(self, prompt: str, what: str = "prompt") -> None:
        self.refuse_if_too_long(self.count_tokens(prompt), what)

    def refuse_if_too_long(self, n: int, what: str = "prompt") -> None:
        if n > self.max_tokens:
            raise InvalidRequest(
                f"{what} is {n} tokens; the model's limit is {self.max_tokens} — shorten it",
                code="prompt_too_long",
            )

    def encode(self, prompt: str) -> PromptEmbedding:
        return self.cached(prompt, lambda: self._encode_uncached(prompt))

    def cached(self, key, compute) -> PromptEmbedding:
        """LRU lookup of an embedding by ``key``; ``compute()`` on a miss."""
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        emb = compute()
        self._cache[key] = emb
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def _encode_uncached(self, prompt: str) -> PromptEmbedding:
        import torch

        self.check(prompt)
        device = self.text_encoder.device
        tokens = self.tokenize([self.template.format(prompt)], return_tensors="pt")
        with torch.inference_mode():
            out = self.text_encoder.model.language_model(
                input_ids=tokens.input_ids.to(device),
                attention_mask=tokens.attention_mask.to(device),
            )
        hidden = out.last_hidden_state[:, self.drop_tokens:]
        return PromptEmbedding(embeds=hidden, tokens=hidden.shape[1])

    def clear(self) -> None:
        self._cache.clear()
