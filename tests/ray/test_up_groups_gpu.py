"""`splitserve up` of a tp = 2 decode group on GPUs (the lead's GPU machine, 2+ GPUs): each rank
gets its bundle's GPU from Ray (rank 0 through the replica actor, rank 1 through its
`FollowerRank` actor), the ranks talk NCCL, and the group answers like the offline engine on one
GPU (float32 tiny Llama: the split's summation order cannot flip a token)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import torch
from ray.util.state import list_actors

from engine import LLM, SamplingParams
from splitserve.ray_deploy.commands import down, up
from tests.engine.parallel_models import save_tiny_llama_with_tokenizer
from tests.ray.test_up import _replicas

pytestmark = pytest.mark.gpu
PROMPTS = ["The capital of France is", "One, two, three,", "Water boils at"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: one per rank of the group")
def test_tp2_group_on_gpus_one_gpu_per_rank_and_greedy_parity(
        ray_cluster: Any, smollm2_path: Path, tmp_path: Path) -> None:
    from cluster.redis_server import free_port

    model = save_tiny_llama_with_tokenizer(tmp_path / "tiny", Path(smollm2_path))
    with LLM(str(model), device="cuda", dtype="float32", exact_attention=True) as llm:
        want = [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY)]
    port = free_port()
    overrides = {"router.port": port, "device": "cuda", "dtype": "float32", "exact_attention": True,
                 "model": str(model), "served_model_name": "tiny", "prefill.replicas": 0, "decode.tp": 2,
                 "kv_cache_memory": "1GiB"}
    assert up("deploy/local.yaml", overrides=overrides, options={"proxy_location": "HeadOnly"},
              out=io.StringIO()) == 0
    try:
        [replica] = _replicas("decode")
        [follower] = list_actors(filters=[("class_name", "=", "FollowerRank"), ("state", "=", "ALIVE")])
        rank0 = next(c for c in psutil.Process(replica["pid"]).children() if "decode_worker" in c.cmdline())
        rank1 = next(c for c in psutil.Process(follower.pid).children() if "worker_runtime.group" in c.cmdline())
        devices = [p.environ()["CUDA_VISIBLE_DEVICES"] for p in (rank0, rank1)]
        assert len(set(devices)) == 2 and all(d.isdigit() for d in devices), devices  # a GPU per rank
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        got = [api.completions.create(model="tiny", prompt=p, max_tokens=GREEDY.max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
        assert got == want
    finally:
        assert down(out=io.StringIO()) == 0
