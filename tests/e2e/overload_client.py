"""A burst of concurrent requests from a process of its own (the load generator must not share the
router's interpreter, or its own work would show up as the router's latency).

    python -m tests.e2e.overload_client URL N  ->  one JSON list on stdout: [status, seconds, retry_after, body]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx

MODEL = "smollm2"
LONG = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(40))


def request(i: int) -> tuple[str, dict[str, object]]:
    """Every third request is long (over disagg_threshold: through the prefill worker); half stream."""
    if i % 3 == 0:
        path, body = "/v1/completions", {"model": MODEL, "prompt": f"{i} {LONG}", "max_tokens": 4}
    else:
        path = "/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 4}
    body["stream"] = i % 2 == 0
    return path, body


async def one(c: httpx.AsyncClient, url: str, i: int, start: asyncio.Event) -> list[object]:
    path, body = request(i)
    await start.wait()
    t0 = time.monotonic()
    r = await c.post(f"{url}{path}", json=body)
    return [r.status_code, time.monotonic() - t0, r.headers.get("retry-after"), r.text]


async def burst(url: str, n: int) -> list[list[object]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        start = asyncio.Event()
        tasks = [asyncio.create_task(one(c, url, i, start)) for i in range(n)]
        await asyncio.sleep(0.1)
        start.set()
        return await asyncio.gather(*tasks)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(burst(sys.argv[1], int(sys.argv[2])))))
