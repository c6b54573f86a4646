"""Collection rules for the whole repository."""

import importlib.util

# Run by tests/test_vllm.py with the vLLM venv's Python; it imports vLLM.
collect_ignore = ["tests/vllm_processor_check.py"]
if importlib.util.find_spec("vllm") is None:  # vLLM lives in a venv of its own (it pins an older transformers)
    collect_ignore.append("hf_plugin/vllm.py")
