"""Markdown tables of a `bench/kernels.py` result, for BENCHMARKS.md."""

from __future__ import annotations

from typing import Any


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(rec: dict[str, Any]) -> str:
    c = rec["ceilings"]
    copy = c["copy_GBs"]
    out = [
        f"Device **{rec['device']}** ({rec.get('sm_count')} SMs), {rec['date']}, commit `{rec['commit']}`, "
        f"torch {rec.get('torch')}, triton {rec.get('triton')}. Ceilings measured in the same run: "
        f"copy {copy:,.0f} GB/s (read + write), bf16 matmul {c['matmul_bf16_TFs']:.0f} TFLOP/s.",
        "",
        "**Decode attention** (32 q / 8 kv heads, d=128, pages of 16; µs per call, CUDA-graph replay over "
        "cold copies of the batch; GB/s = (KV + q + out bytes) / time):",
        "",
    ]
    rows = []
    for r in rec.get("decode", []):
        if "error" in r:
            rows.append([r["batch"], r["ctx"], r["kv"], r["error"]] + [None] * 9)
            continue
        rows.append(
            [
                r["batch"],
                r["ctx"],
                r["kv"],
                r.get("splits_auto"),
                r.get("auto_us"),
                r.get("auto_GBs"),
                r.get("auto_vs_copy"),
                r.get("single_us"),
                r.get("multi_us"),
                r.get("multi_speedup"),
                r.get("sdpa_us"),
                r.get("sdpa_GBs"),
                max(r.get(k, 0.0) for k in ("auto_err", "single_err", "multi_err")),
            ]
        )
    out.append(
        _table(
            [
                "batch",
                "ctx",
                "KV",
                "splits (auto)",
                "auto µs",
                "auto GB/s",
                "vs copy",
                "single-block µs",
                "multi-block µs",
                "multi / single speed-up",
                "torch SDPA µs",
                "SDPA GB/s",
                "max rel err",
            ],
            rows,
        )
    )
    fp8 = [r for r in rec.get("decode", []) if "auto_bf16dot_us" in r]
    if fp8:
        out += [
            "",
            "FP8 rows widen K/V to fp16 for the products; widened to bf16 instead they take "
            + ", ".join(f"{r['auto_bf16dot_us']:.0f} µs (batch {r['batch']}, ctx {r['ctx']})" for r in fp8)
            + ".",
        ]
    out += [
        "",
        f"**Context (prefill) attention** (bf16, paged KV; TFLOP/s of causal attention; "
        f"vs matmul = / {c['matmul_bf16_TFs']:.0f}):",
        "",
    ]
    rows = [
        [
            r["batch"],
            r["q_len"],
            r["prefix"],
            r.get("ours_ms"),
            r.get("ours_TFs"),
            r.get("ours_vs_matmul"),
            r.get("best_cfg"),
            r.get("best_TFs"),
            r.get("sdpa_TFs"),
            r.get("ours_vs_sdpa"),
            r.get("ours_err"),
        ]
        for r in rec.get("context", [])
    ]
    out.append(
        _table(
            [
                "batch",
                "new tokens",
                "cached prefix",
                "ours ms",
                "ours TFLOP/s",
                "vs matmul",
                "best config run",
                "best TFLOP/s",
                "SDPA flash TFLOP/s",
                "ours / SDPA",
                "rel err",
            ],
            rows,
        )
    )
    out += ["", "**Fused ops** (bf16; GB/s over the bytes each op must move):", ""]
    rows = [
        [r["op"], r["ours_us"], r["GBs"], r["vs_copy"], r["torch_us"], r["torch_us"] / r["ours_us"], r["err"]]
        for r in rec.get("fused", [])
    ]
    out.append(_table(["op", "ours µs", "GB/s", "vs copy", "torch eager µs", "speed-up", "rel err"], rows))
    return "\n".join(out)
