"""Named exceptions raised by the engine.

Every user-facing failure inside the engine is one of these, so callers (the router, the CLI,
workers) can map them to a clear message or an HTTP 4xx without string matching.
"""

from __future__ import annotations


class SplitserveError(Exception):
    """Base class of every error splitserve raises on purpose."""


class InvalidRequestError(SplitserveError, ValueError):
    """A request is malformed: empty prompt, bad sampling parameter, wrong type."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus the tokens asked for, where relevant) exceeds max_model_len."""


class DeviceUnavailableError(SplitserveError, ValueError):
    """The configured device does not exist here (``cuda`` on a CPU-only torch or machine)."""


class ModelNotFoundError(SplitserveError, FileNotFoundError):
    """The model path does not exist or lacks a required file."""


class UnsupportedModelError(SplitserveError):
    """The model's architecture or a feature of its config is not implemented."""


class WeightLoadError(SplitserveError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape."""


class OutOfBlocksError(SplitserveError):
    """The KV cache has no free blocks for an allocation that must succeed."""


class RequestStepError(SplitserveError):
    """A step failed because of one request (its stop check, its text): only it must end."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id
