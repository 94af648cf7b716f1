"""Errors a user of splitserve can act on; each carries a message meant to be shown as is."""


class SplitserveError(Exception):
    """Base class of the errors splitserve raises on purpose."""


class InvalidRequestError(SplitserveError, ValueError):
    """A request that can never be served as given (empty prompt, bad sampling parameters, ...)."""


class ModelLoadError(SplitserveError):
    """A model path that does not exist, or a checkpoint splitserve cannot run."""
