"""A CPU allocation failure is the typed ``out_of_memory`` error, not an internal error (SECURITY 21, 34)."""

from __future__ import annotations

import pytest

from qwenstudio.engine.engine import out_of_memory_as_typed_error
from qwenstudio.errors import GenerationFailed


def test_cpu_allocator_failure_is_out_of_memory():
    import torch

    with pytest.raises(GenerationFailed) as info, out_of_memory_as_typed_error():
        torch.empty(2**50, dtype=torch.uint8)  # a real allocation the CPU allocator refuses
    assert info.value.code == "out_of_memory" and info.value.status == 500


def test_memory_error_is_out_of_memory_and_other_runtime_errors_pass_through():
    with pytest.raises(GenerationFailed) as info, out_of_memory_as_typed_error():
        bytearray(2**62)  # Python's own allocator refuses: MemoryError
    assert info.value.code == "out_of_memory"
    with pytest.raises(RuntimeError, match="shape mismatch"), out_of_memory_as_typed_error():
        raise RuntimeError("shape mismatch")
