"""A base model behind an OpenAI-compatible HTTP API: probing it, caching its top-k log-probs, generating with it.

Needs the `remote` extra (`pip install 'hf-plugin[remote]'`, the `openai` client).
"""

from .client import PositionLogprobs, RemoteBase, RemoteBaseError, ServerCapabilities
from .tokens import TokenStrings

__all__ = ["PositionLogprobs", "RemoteBase", "RemoteBaseError", "ServerCapabilities", "TokenStrings"]
