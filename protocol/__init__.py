"""Every contract that crosses a process boundary, and the one conversion of each to the wire.

Below the router, the workers and the launchers, which import it and never each other: the
worker API (`proto/worker.proto` and its stubs), its clients (`decode_client`, `prefill_client`),
the engine-type <-> protobuf conversions (`wire`), the decode stream's events (`stream`), the
prefill -> decode transfer notifications (`prefill_notify`), the KV handshake (`kv_handshake`),
the Redis control plane's records and client (`registry`, `control_plane`), the worker launch
spec (`worker_spec`) and the cluster-token auth of gRPC (`grpc_auth`).
"""
