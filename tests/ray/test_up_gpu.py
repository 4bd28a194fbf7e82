"""`splitserve up` on GPUs (the lead's GPU machine, 2+ GPUs): each worker replica gets its own
GPU from Ray (its placement group's bundle), and the cluster answers like the offline engine."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import torch

from engine import SamplingParams
from splitserve.ray_deploy import APP_NAME
from splitserve.ray_deploy.commands import _details, down, up

pytestmark = pytest.mark.gpu
QUESTION = "What is the capital of France?"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: one per worker replica")
def test_up_on_gpus_one_gpu_per_replica_and_greedy_parity(ray_cluster: Any, smollm2_path: Path) -> None:
    from cluster.redis_server import free_port
    from engine.llm import LLM

    port = free_port()
    overrides = {"router.port": port, "device": "cuda", "dtype": "float32", "exact_attention": True}
    assert up("deploy/local.yaml", overrides=overrides, options={"proxy_location": "HeadOnly"},
              out=io.StringIO()) == 0
    try:
        deployments = _details()["applications"][APP_NAME]["deployments"]
        devices = []
        for pool in ("prefill", "decode"):
            replica = deployments[pool]["replicas"][0]
            worker = next(c for c in psutil.Process(replica["pid"]).children() if "_worker" in " ".join(c.cmdline()))
            devices.append(worker.environ()["CUDA_VISIBLE_DEVICES"])
        assert len(set(devices)) == 2, devices  # Ray gave each replica a GPU of its own
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        r = api.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                        max_tokens=16, temperature=0)
        ref = LLM(smollm2_path, device="cuda", dtype="float32", exact_attention=True).generate(
            [[{"role": "user", "content": QUESTION}]], SamplingParams(max_tokens=16, temperature=0.0))[0]
        assert r.choices[0].message.content == ref.text
    finally:
        assert down(out=io.StringIO()) == 0
