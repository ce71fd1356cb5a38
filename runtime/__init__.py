"""genfuse.runtime: models, weight loaders, KV cache, sampler, engine (builds on genfuse.kernels).

`LLM`, `SamplingParams` and `Completion` are the public generation API; they are imported on
first use so that loading this package stays cheap.
"""
__all__ = ["LLM", "SamplingParams", "Completion"]


def __getattr__(name):
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    if name in ("LLM", "Completion"):
        from . import llm

        return getattr(llm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
