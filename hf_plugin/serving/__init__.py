"""`hf-plugin serve`: a base model and its reweighters behind an OpenAI-compatible HTTP API.

Needs the `serve` extra (`pip install "hf-plugin[serve]"`: FastAPI and uvicorn). The library never imports this
package; the command line imports it only for `hf-plugin serve`.
"""

from __future__ import annotations

import ipaddress
import logging

from .app import create_app, served_models
from .engine import GenerationEngine, GenerationJob, ServedModel
from .protocol import APIError, ServerLimits


logger = logging.getLogger("hf_plugin.serving")

__all__ = [
    "APIError", "GenerationEngine", "GenerationJob", "ServedModel", "ServerLimits", "create_app", "run_server",
    "served_models",
]


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves `app` with uvicorn until interrupted; warns when it listens beyond loopback without an API key."""
    import uvicorn

    if not _is_loopback(host) and app.state.api_key is None:
        logger.warning("Listening on %s without an API key: anyone who can reach this port can use the models.", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
