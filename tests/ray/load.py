"""Continuous chat traffic on threads through the official `openai` client, recording every
outcome, for the tests that change the cluster under load."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import openai


class ContinuousLoad:
    """``threads`` clients each sending short greedy chats back to back until the block ends."""

    def __init__(self, base_url: str, threads: int = 2, max_tokens: int = 6) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
        self.max_tokens = max_tokens
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                r = self.client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": f"Count to {i + n % 7}."}],
                    max_tokens=self.max_tokens, temperature=0)
                assert r.choices[0].finish_reason in ("stop", "length")
                with self._lock:
                    self.ok += 1
            except Exception as e:  # every failure is recorded: the tests assert on them
                with self._lock:
                    self.failures.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                time.sleep(0.2)

    def wait_for_more(self, n: int, timeout: float = 120.0) -> None:
        """Until ``n`` more requests succeeded (the cluster kept serving)."""
        target = self.ok + n
        deadline = time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"only {self.ok} ok of {target}; failures: {self.failures[-3:]}"
            time.sleep(0.1)

    def __enter__(self) -> ContinuousLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(150)
