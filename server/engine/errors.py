"""The engine's typed errors. They carry no HTTP status: server/api/errors.py maps each type to
its answer (ENGINE_ERRORS), as it maps the adapters' own (ADAPTER_ERRORS).

Two kinds: refusals that `Engine.add_requests` raises (the request never entered), and the
failure a request finishes with (`RequestOutput.error`: an `EngineError` here, or the
adapters' `AdapterError` when its adapter could not be loaded at admission).
"""

from __future__ import annotations

from adapterserve.adapters.errors import AdapterError


class EngineError(Exception):
    """Base of the engine's errors; `param` names the request field at fault, if one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param

    def __reduce__(self):
        # Rebuilt whole (a subclass's own fields too): the engine core process and cluster
        # replicas hand these to the front end (pickle of our own objects between our own
        # processes; never user data).
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[EngineError], args: tuple, state: dict) -> EngineError:
    error = Exception.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidRequestError(EngineError):
    """A request the engine can never serve (its adapter's virtual tokens overflow the context)."""


class ModelNotFoundError(EngineError):
    """`model` names neither the base model nor a registered adapter."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the model {name!r} does not exist", "model")
        self.name = name


class QueueFullError(EngineError):
    """The waiting queue is full right now: retryable."""


class EngineDeadError(EngineError):
    """The engine hit a fatal fault or is shutting down: raised by `add_requests`, and the
    error of every request that a fatal fault ended."""


class ReplicaLostError(EngineError):
    """A cluster replica serving the request died or could not be reached (server/cluster):
    retryable, another replica serves it."""


class EngineRestartingError(ReplicaLostError):
    """The engine core process serving the request died and is being restarted
    (server/engine/process.py): retryable once it is up again (/ready)."""


class RequestAbortedError(EngineError):
    """The engine stopped (or the client left) before the request finished."""


EngineFailure = EngineError | AdapterError  # what a failed RequestOutput carries
