"""splitserve: disaggregated prefill/decode LLM serving.

The public Python API is `LLM` (load a model, generate) and `SamplingParams`. `LLM` loads on first use, so
that processes which never run a model (the router) never import torch.
"""

from splitserve.engine.params import SamplingParams
from splitserve.errors import InvalidRequestError, ModelLoadError, SplitserveError

__all__ = ["LLM", "InvalidRequestError", "ModelLoadError", "RequestOutput", "SamplingParams", "SplitserveError"]


def __getattr__(name: str):
    if name in ("LLM", "RequestOutput"):
        from splitserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
