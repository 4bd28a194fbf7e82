"""nccl backend: what runs without GPUs (the send/receive plan, the refusals), plus a two-GPU
push/pull on the GPU machine.

NCCL point-to-point pairs the n-th send with the n-th receive, so the plan both sides derive
from the same ranges must be identical in order and sizes: pinned here exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.config import ConfigError, config_from_dict, load_config
from engine.kv_cache_pool import KVLayout
from kvtransfer import KVTransferError, create_transport
from kvtransfer.descriptors import ByteRanges
from kvtransfer.nccl_plan import plan_ops, read_ops, write_ops
from protocol import kv_handshake as handshake
from protocol.kv_handshake import PeerInfo

LAYOUT = KVLayout(num_layers=2, num_blocks=8, num_kv_heads=2, block_size=16, head_dim=64, dtype=torch.float16)


def test_plan_splits_large_ranges_in_order() -> None:
    ops = plan_ops(np.array([0, 1000]), np.array([500, 0]), np.array([250, 100]), max_bytes=100)
    assert ops.send.tolist() == [0, 100, 200, 1000]
    assert ops.recv.tolist() == [500, 600, 700, 0]
    assert ops.nbytes.tolist() == [100, 100, 50, 100]
    assert len(ops) == 4


def test_both_sides_derive_the_same_pieces() -> None:
    ranges = ByteRanges(np.array([0, 4096, 65536]), np.array([8192, 0, 16384]), np.array([4096, 12288, 4096]))
    w, r = write_ops(ranges, max_bytes=8192), read_ops(ranges, max_bytes=8192)
    assert w.nbytes.tolist() == r.nbytes.tolist() == [4096, 8192, 4096, 4096]
    assert w.send.tolist() == r.recv.tolist() == [0, 4096, 12288, 65536]  # our offsets, either way
    assert w.recv.tolist() == r.send.tolist() == [8192, 0, 8192, 16384]
    assert int(w.nbytes.sum()) == ranges.total_bytes


def test_plan_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        plan_ops(np.array([0]), np.array([0, 1]), np.array([1]))
    with pytest.raises(ValueError, match="non-empty"):
        plan_ops(np.array([0]), np.array([0]), np.array([0]))
    with pytest.raises(ValueError, match="positive"):
        plan_ops(np.array([0]), np.array([0]), np.array([1]), max_bytes=0)
    assert len(plan_ops(np.array([]), np.array([]), np.array([]))) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal: this machine has a GPU")
def test_refused_on_a_machine_without_cuda() -> None:
    with pytest.raises(KVTransferError, match="moves GPU memory only and this machine has no CUDA device"):
        create_transport("nccl", "prefill-0")


def test_config_with_nccl_on_cpu_names_the_field() -> None:
    data = load_config(None).to_dict()
    data.update(device="cpu", kvtransfer={**data.get("kvtransfer", {}), "backend": "nccl"})
    with pytest.raises(ConfigError, match=r"kvtransfer\.backend: nccl moves GPU memory only"):
        config_from_dict(data)


def _peer(device: str, gpu: str | None) -> PeerInfo:
    compat = handshake.full_compat(LAYOUT, {"model": "m"})
    endpoint = {"host": "127.0.0.1", "port": 1, **({"gpu": gpu} if gpu else {})}
    return PeerInfo("decode-0", "nccl", LAYOUT, compat, device, 0, 0x1000, LAYOUT.total_bytes, endpoint)


def test_handshake_refuses_host_pools_and_a_shared_gpu() -> None:
    from kvtransfer.nccl_backend import check_gpu_peer

    with pytest.raises(KVTransferError, match="has its KV pool on cpu"):
        check_gpu_peer(_peer("cpu", None), "GPU-a")
    with pytest.raises(KVTransferError, match=r"runs on our GPU .*NCCL cannot connect two workers on one device"):
        check_gpu_peer(_peer("cuda", "GPU-a"), "GPU-a")
    check_gpu_peer(_peer("cuda", "GPU-b"), "GPU-a")  # another GPU: accepted


@pytest.mark.gpu
def test_host_pool_is_refused_on_a_gpu_machine() -> None:
    from engine.kv_cache_pool import KVCachePool

    transport = create_transport("nccl", "prefill-0")
    try:
        with pytest.raises(KVTransferError, match="KV pool is in host memory"):
            transport.register_pool(KVCachePool(LAYOUT, "cpu"), {"model": "m"})
    finally:
        transport.close()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two workers needs two GPUs")
def test_two_gpu_push_and_pull() -> None:
    from tests.kvtransfer.peer_process import PeerSpec
    from tests.kvtransfer.test_transport import Peer, expected_after, push_and_check

    prefill = Peer(PeerSpec("nccl", "prefill-0", num_blocks=16, seed=1, device="cuda:0")).ready()
    decode = Peer(PeerSpec("nccl", "decode-0", num_blocks=24, seed=2, device="cuda:1")).ready()
    try:
        assert prefill.call("add_peer", decode.metadata) == "decode-0"
        assert decode.call("add_peer", prefill.metadata) == "prefill-0"
        push_and_check(prefill, decode, [1, 5, 6, 7, 12, 13], [20, 3, 4, 5, 0, 9], layers=[2])
        push_and_check(prefill, decode, list(range(16)), list(range(8, 24)), layers=None)
        src0, dst0 = prefill.call("snapshot"), decode.call("snapshot")
        decode.call("read", "prefill-0", [3, 4, 9], [7, 8, 1], None, b"read-done", 30.0)
        assert torch.equal(decode.call("snapshot"), expected_after(dst0, src0, [3, 4, 9], [7, 8, 1], None))
        assert prefill.call("wait_notification", 10.0)[:2] == ("decode-0", b"read-done")
    finally:
        for peer in (prefill, decode):
            assert peer.close() < 5.0
