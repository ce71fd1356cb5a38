"""genfuse: a custom-kernel inference runtime for generative models.

The public facade: ``genfuse.kernels`` holds the Triton kernels (each with its torch
reference); the runtime (models, KV cache, engine) lands in ``genfuse.runtime``.
"""
__version__ = "0.1.0"

from genfuse import kernels  # noqa: E402  (re-exported: genfuse.kernels.attention, ...)
from genfuse.runtime.accelerate import accelerate  # noqa: E402

__all__ = ["__version__", "kernels", "accelerate"]

__all__ += ["LLM", "SamplingParams", "Completion", "Engine", "AsyncEngine", "EngineArgs", "RequestOutput"]


def __getattr__(name):
    # the generation API, loaded on first use (tokenizer, weight loaders): `import genfuse` stays cheap
    if name in ("LLM", "SamplingParams", "Completion", "Engine", "AsyncEngine", "EngineArgs", "RequestOutput"):
        from genfuse import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'genfuse' has no attribute {name!r}")
