"""The engine's KV connector: how a worker's engine exchanges prompt KV with a peer engine.

The engine knows only `KVConnector` (this package); the implementations live in the worker
packages, next to the transport and RPCs they use (`prefill_worker.connector`,
`decode_worker.connector`). No connector = the offline engine.
"""

from engine.kv_connector.base import KVArrival, KVConnector, KVFailure, KVPoll, KVStepOutcome

__all__ = ["KVArrival", "KVConnector", "KVFailure", "KVPoll", "KVStepOutcome"]
