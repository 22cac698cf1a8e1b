"""pagedlab: an LLM inference engine on paged KV-cache memory, and a lab that shows why paging wins."""
import os as _os

# In a source checkout the Triton kernels live in the top-level kernels/ directory; make them importable as
# pagedlab.kernels (an installed wheel maps them there through setuptools' package-dir instead).
_repo_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_repo_root, "kernels", "__init__.py")):
    __path__.append(_repo_root)

from pagedlab.config import ConfigError, EngineConfig  # noqa: E402
from pagedlab.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "ConfigError", "AsyncLLMEngine", "__version__"]


def __getattr__(name):
    # The engine pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from pagedlab.engine.llm import LLM
        return LLM
    if name == "AsyncLLMEngine":
        from pagedlab.engine.async_engine import AsyncLLMEngine
        return AsyncLLMEngine
    raise AttributeError(f"module 'pagedlab' has no attribute {name!r}")
