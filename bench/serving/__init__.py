"""`splitserve bench`: a load generator for any OpenAI-compatible serving endpoint.

Modelled on vLLM's ``benchmark_serving`` and SGLang's ``bench_serving``: synthetic prompts of a
requested token length (`workload`), sent on a schedule (`arrivals`) as streaming requests
(`client`, driven by `runner`), summarised as latency percentiles, throughput and goodput
(`metrics`), printed and saved as JSON, and compared side by side (`report`). `cli` wires them.
"""
