"""splitserve: disaggregated prefill/decode LLM serving.

The public Python API is `LLM` (load a model, generate) and `SamplingParams`.
"""

from splitserve.engine.sampling import SamplingParams
from splitserve.errors import InvalidRequestError, ModelLoadError, SplitserveError
from splitserve.llm import LLM, RequestOutput

__all__ = ["LLM", "InvalidRequestError", "ModelLoadError", "RequestOutput", "SamplingParams", "SplitserveError"]
