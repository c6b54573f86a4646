"""A base model behind an OpenAI-compatible HTTP API: probing it, caching its top-k log-probs, generating with it.

Needs the `remote` extra (`pip install 'hf-plugin[remote]'`, the `openai` client).
"""

from .cache import RemoteCacheSource, write_remote_caches
from .check import compare_with_local
from .client import PositionLogprobs, RemoteBase, RemoteBaseError, ServerCapabilities
from .generation import RemoteCausalLM
from .tokens import TokenStrings

__all__ = [
    "PositionLogprobs", "RemoteBase", "RemoteBaseError", "RemoteCacheSource", "RemoteCausalLM", "ServerCapabilities",
    "TokenStrings", "compare_with_local", "write_remote_caches",
]
