"""Decode steps on persistent, padded inputs (the CUDA-graph path, run eagerly on CPU) give the
same greedy tokens as unpadded decode; the row bookkeeping under it keeps rows dense."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import graph_batch_sizes
from engine.input_batch import BatchRows, DecodeInputs
from engine.sequence import Sequence
from tests.engine.tiny_llama import write_tiny_llama


def test_ladder_pads_to_captured_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    assert graph_batch_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    with pytest.raises(ValueError, match="max_num_seqs"):
        graph_batch_sizes(0)


def test_rows_stay_dense_and_moves_are_disjoint() -> None:
    rows = BatchRows()
    ch = rows.update(["a", "b", "c", "d", "e"])
    assert ch.added == [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")] and not ch.moves
    assert not rows.update(["e", "d", "c", "b", "a"]).changed  # same set: rows kept
    ch = rows.update(["a", "c", "e", "f"])  # b and d leave, f joins
    assert ch.moves == [(4, 1)]  # e fills b's hole; d's hole is past the end
    assert rows.ids == ["a", "e", "c", "f"] and ch.added == [(3, "f")] and ch.size == 4
    srcs, dsts = {s for s, _ in ch.moves}, {d for _, d in ch.moves}
    assert not srcs & dsts
    ch = rows.update([])
    assert rows.ids == [] and ch.size == 0
    with pytest.raises(ValueError, match="duplicate"):
        rows.update(["x", "x"])


def _seq(name: str, prompt: list[int], computed: int) -> Sequence:
    s = Sequence(name, name, prompt, SamplingParams())
    s.num_computed_tokens = computed
    return s


def test_decode_inputs_pad_and_grow_tables_in_place() -> None:
    inputs = DecodeInputs(max_rows=8, max_blocks=4, block_size=16, device=torch.device("cpu"))
    rows = BatchRows()
    a, b = _seq("a", list(range(20)), 19), _seq("b", list(range(40, 56)), 15)
    inputs.apply(rows.update(["a", "b"]))
    ids, meta = inputs.prepare([a, b], [[3, 5], [7]], padded=4)
    assert ids.tolist() == [19, 55, 0, 0]
    assert meta.positions.tolist() == [19, 15, 0, 0]
    assert meta.seq_lens.tolist() == [20, 16, 0, 0]
    assert meta.slot_mapping.tolist() == [5 * 16 + 3, 7 * 16 + 15, -1, -1]  # padding writes no KV
    assert meta.block_tables[:2, :2].tolist() == [[3, 5], [7, 0]]
    # b crosses a block boundary: one block id appended to its row, the rest untouched
    a.num_computed_tokens, b.num_computed_tokens = 20, 16
    a.output_token_ids.append(99)
    b.output_token_ids.append(98)
    ids, meta = inputs.prepare([a, b], [[3, 5], [7, 9]], padded=2)
    assert ids.tolist() == [99, 98] and meta.slot_mapping.tolist() == [5 * 16 + 4, 9 * 16]
    assert meta.block_tables.tolist() == [[3, 5, 0, 0], [7, 9, 0, 0]]
    # a leaves: b moves to row 0 and keeps its table
    inputs.apply(rows.update(["b"]))
    _, meta = inputs.prepare([b], [[7, 9]], padded=1)
    assert meta.block_tables.tolist() == [[7, 9, 0, 0]]
    # a table that no longer extends the row's (a re-allocated sequence) is rewritten
    _, meta = inputs.prepare([b], [[4, 6]], padded=1)
    assert np.array_equal(meta.block_tables[0, :2].numpy(), [4, 6])
    with pytest.raises(ValueError, match="max_blocks"):
        inputs.prepare([b], [[1, 2, 3, 4, 5]], padded=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def _generate(model: str, graphs: bool, prompts: list[list[int]], params: list[SamplingParams], **kw: object):
    llm = LLM(model, random_weights=True, cuda_graphs=graphs, max_model_len=256, **kw)
    padded: list[int] = []
    decode = llm.engine.runner.forward_decode

    def spy(seqs, tables):
        hidden, meta = decode(seqs, tables)
        padded.append(int(hidden.shape[0]) - len(seqs))
        return hidden, meta

    llm.engine.runner.forward_decode = spy  # type: ignore[method-assign]
    outs = llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], padded


def test_padded_decode_matches_unpadded_greedy(tiny: str) -> None:
    prompts = [[5 + i, 17, 33 + i, 9] * (1 + i % 3) for i in range(7)]
    # different lengths: the batch shrinks 7 -> 5 -> 3 -> 1 and pads to 8, 8, 4, 1
    params = [SamplingParams(max_tokens=6 + 4 * (i % 4), temperature=0, ignore_eos=True) for i in range(7)]
    on, pads_on = _generate(tiny, True, prompts, params, max_num_seqs=8)
    off, pads_off = _generate(tiny, False, prompts, params, max_num_seqs=8)
    assert on == off
    assert any(p > 0 for p in pads_on), "the padded path never ran with padding"
    assert pads_off and not any(pads_off)


def test_batch_larger_than_rows_runs_eagerly(tiny: str) -> None:
    """More sampling rows than max_num_seqs cannot happen through the scheduler; chunked
    prefill still mixes prefill and decode rows, which take the eager path: same tokens."""
    prompts = [[3 + i] * (20 + 7 * i) for i in range(4)]
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)] * 4
    on, _ = _generate(tiny, True, prompts, params, max_num_seqs=4, max_num_batched_tokens=32)
    off, _ = _generate(tiny, False, prompts, params, max_num_seqs=4, max_num_batched_tokens=32)
    assert on == off


def test_smollm2_padded_decode_matches_unpadded(smollm2_path) -> None:
    """One engine (loading SmolLM2 twice is slow on CPU): padded first, then unpadded decode."""
    llm = LLM(str(smollm2_path), max_num_seqs=4, kv_cache_memory=16 * 2**20, max_model_len=128)
    prompts = ["The capital of France is", "1, 2, 3,", "Once upon a time"]
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True) for i in range(3)]
    runner = llm.engine.runner
    assert runner.graphs.padded_size(3) == 4
    on = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    runner.graphs.sizes = []  # what cuda_graphs=False leaves: decode unpadded
    assert runner.graphs.padded_size(3) == 3
    off = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert on == off
