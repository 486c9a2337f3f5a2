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
    def __init__(self, tokenizer, text_encoder, *, template: str, drop_tokens: int, max_tokens: int, cache_size=64):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.template = template
        self.drop_tokens = drop_tokens
        self.max_tokens = max_tokens
        self.cache_size = cache_size
        self._cache: OrderedDict[str, PromptEmbedding] = OrderedDict()
        # Fast tokenizers are not safe to call from two threads at once ("Already borrowed"): the server checks
        # prompts on request threads while the worker encodes.
        self.tokenizer_lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def count_tokens(self, prompt: str) -> int:
        with self.tokenizer_lock:
            ids = self.tokenizer(self.template.format(prompt)).input_ids
        return len(ids) - self.drop_tokens

    def check(self, prompt: str) -> None:
        n = self.count_tokens(prompt)
        if n > self.max_tokens:
            raise InvalidRequest(
                f"prompt is {n} tokens; the model's limit is {self.max_tokens} — shorten it",
                code="prompt_too_long",
            )

    def encode(self, prompt: str) -> PromptEmbedding:
        cached = self._cache.get(prompt)
        if cached is not None:
            self._cache.move_to_end(prompt)
            self.hits += 1
            return cached
        self.misses += 1
        emb = self._encode_uncached(prompt)
        self._cache[prompt] = emb
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return emb

    def _encode_uncached(self, prompt: str) -> PromptEmbedding:
        import torch

        self.check(prompt)
        device = self.text_encoder.device
        with self.tokenizer_lock:
            tokens = self.tokenizer([self.template.format(prompt)], return_tensors="pt")
        with torch.inference_mode():
            out = self.text_encoder.model.language_model(
                input_ids=tokens.input_ids.to(device),
                attention_mask=tokens.attention_mask.to(device),
            )
        hidden = out.last_hidden_state[:, self.drop_tokens:]
        return PromptEmbedding(embeds=hidden, tokens=hidden.shape[1])

    def clear(self) -> None:
        self._cache.clear()
