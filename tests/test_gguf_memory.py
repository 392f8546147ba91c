"""Loading a real-width GGUF Q4_K_M transformer (hidden 3072, 24 heads, context 4096; 1 double + 1 single block)
with its blocks kept adds at most 1.2× the file to the process's peak RSS, where expanding it to bf16 adds 4×."""

from __future__ import annotations

import pytest

from benchmarks.load_memory import measure, write_gguf_q4_k_m

pytest.importorskip("gguf")


@pytest.mark.slow
def test_a_q4_k_m_file_kept_quantized_costs_its_size_in_memory(tmp_path):
    path = tmp_path / "Q4_K_M.gguf"
    size = write_gguf_q4_k_m(path)
    # in a fresh process: the peak resident set after loading and touching every weight, less the one before
    kept = measure(path, "bfloat16")
    assert kept["model_bytes"] <= 1.01 * size  # the model holds the file's blocks, not a wider copy
    assert kept["added"] <= 1.2 * size, f"peak RSS added {kept['added'] / size:.2f}× the file"
