"""Expert parallelism over real processes (gloo): ep=2 gives ep=1's logits and greedy tokens.

A random-weight tiny Mixtral (float32, saved as safetensors) is served by two ranks that each
load only their half of the experts and exchange tokens with all-to-all; then by tp=2 (attention
heads split, every expert's intermediate dimension split) and by tp=2 with ep=2.
"""

from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp

from engine.layers.moe import EP_SINGLE
from tests.engine.ep_ranks import greedy_run, rank_main
from tests.engine.test_moe_hf_parity import hf_moe

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [120, 7, 7, 33, 2, 150, 90, 14, 66, 1, 9, 23, 47, 5, 88, 31, 70, 12]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ep2_matches_ep1(tmp_path) -> None:
    hf, _ = hf_moe("mixtral", seed=11)  # 4 experts, top-2
    model_dir = tmp_path / "mixtral"
    hf.save_pretrained(model_dir)
    want = greedy_run(str(model_dir), EP_SINGLE, PROMPTS, steps=4)

    mp.start_processes(
        rank_main, args=(2, _free_port(), str(model_dir), str(tmp_path), PROMPTS), nprocs=2, start_method="spawn"
    )
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for shape in ("ep", "tp", "tp+ep"):
            got = result[shape]
            assert got["tokens"] == want["tokens"], (rank, shape)
            torch.testing.assert_close(got["last_logits"], want["last_logits"], rtol=1e-5, atol=1e-5)
        layer = result["layer"]
        assert float(layer["err0"]) == 0.0  # no tokens: an empty result, no hang
        assert float(layer["err1"]) < 1e-5 and float(layer["err7"]) < 1e-5
