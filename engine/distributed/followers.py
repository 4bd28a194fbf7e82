"""The follower ranks of an offline group: started by rank 0 (`engine.LLM`), one process each.

A follower builds the same shard and pool as rank 0 would at its rank, then runs rank 0's step
plans until told to stop. Rank 0 joins the group only while every follower is alive, so a
follower that dies at start-up is an error, not a rendezvous that waits forever.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable

import torch

from engine.config import EngineConfig
from engine.distributed.plan import StepPlan, broadcast_plan
from engine.distributed.rank_setup import load_rank_model, rank_kv_layout
from engine.distributed.runner import GroupRunner, make_runner
from engine.distributed.world import GroupSetupError, close_world, current_world, init_world, rank_device
from engine.kv_cache_pool import KVCachePool

JOIN_TIMEOUT_S = 600.0


def rank_config(cfg: EngineConfig, rank: int) -> EngineConfig:
    """``cfg`` as global rank ``rank`` of its group sees it (its tp/pp position and its device)."""
    return dataclasses.replace(cfg, parallel=cfg.parallel.for_rank(rank), device=rank_device(cfg.device, rank))


def join_group(cfg: EngineConfig, address: str) -> None:
    """Join ``cfg``'s group as its rank (``cfg.parallel``), on its device."""
    p = cfg.parallel
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(cfg.device))
    else:  # the ranks share the host's cores; oversubscribed threads stall every collective
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // p.world_size))
    init_world(address, p.rank, p.tp_size, p.pp_size, cfg.device)


def serve_as_follower(cfg: EngineConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Build this rank's shard and pool (``on_ready`` then), follow rank 0's plans until it stops us."""
    torch.manual_seed(cfg.seed)
    model_cfg, model = load_rank_model(cfg)
    pool = KVCachePool(rank_kv_layout(model_cfg, cfg), cfg.device)
    runner = make_runner(model, pool, (), cfg)
    assert isinstance(runner, GroupRunner)
    if on_ready is not None:
        on_ready()
    runner.follow()


def release_followers() -> None:
    """Rank 0, on shutdown: tell the followers to leave (the engine loop must be stopped), then leave."""
    world = current_world()
    try:
        if world is not None and world.rank == 0:
            broadcast_plan(StepPlan(stop=True), world.control)
    except RuntimeError:
        pass  # a follower is already gone; the launcher reaps the rest
    finally:
        close_world()


def follower_main(cfg: EngineConfig, address: str) -> None:
    join_group(cfg, address)
    try:
        serve_as_follower(cfg)
    finally:
        close_world()


def _encode(cfg: EngineConfig) -> str:
    return base64.b64encode(pickle.dumps(cfg)).decode()


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class FollowerSet:
    """Rank 0's handle on the follower processes it started (this process becomes rank 0)."""

    def __init__(self, cfg: EngineConfig) -> None:
        address = free_address()
        self._threads = torch.get_num_threads()  # `join_group` lowers it for CPU ranks; restored on exit
        # a fresh interpreter per rank (not multiprocessing): no re-import of the caller's __main__
        self.procs: list[subprocess.Popen[bytes]] = [
            subprocess.Popen([sys.executable, "-m", __name__, _encode(rank_config(cfg, r)), address])
            for r in range(1, cfg.parallel.world_size)
        ]
        try:
            self._join(rank_config(cfg, 0), address)
        except BaseException:
            self.kill()
            raise

    def _join(self, cfg: EngineConfig, address: str) -> None:
        errors: list[BaseException] = []

        def join() -> None:
            try:
                join_group(cfg, address)
            except BaseException as e:  # handed to the caller thread
                errors.append(e)

        t = threading.Thread(target=join, daemon=True, name="splitserve-group-join")
        t.start()
        waited = 0.0
        while t.is_alive():
            t.join(0.2)
            waited += 0.2
            dead = [(r, p.returncode) for r, p in enumerate(self.procs, 1) if p.poll() is not None]
            if dead or waited > JOIN_TIMEOUT_S:
                why = f"follower rank {dead[0][0]} exited with code {dead[0][1]}" if dead else "timed out"
                raise GroupSetupError(f"the worker group did not form: {why} (see its output above)")
        if errors:
            raise errors[0]

    def join(self, timeout: float = 30.0) -> None:
        """Wait for the followers to leave (after `GroupRunner.stop_followers`), then leave ourselves."""
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        close_world()
        torch.set_num_threads(self._threads)


if __name__ == "__main__":
    follower_main(pickle.loads(base64.b64decode(sys.argv[1])), sys.argv[2])
