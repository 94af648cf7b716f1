"""Errors a user of splitserve can act on; each carries a message meant to be shown as is."""


class SplitserveError(Exception):
    """Base class of the errors splitserve raises on purpose."""


class InvalidRequestError(SplitserveError, ValueError):
    """A request that can never be served as given (empty prompt, bad sampling parameters, ...).

    `param` names the offending field and `code` an OpenAI error code, where one applies (the router
    puts both in its error body)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class ModelLoadError(SplitserveError):
    """A model path that does not exist, or a checkpoint splitserve cannot run."""
