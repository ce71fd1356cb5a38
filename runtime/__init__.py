"""genfuse.runtime: models, weight loaders, KV cache, sampler, engine (builds on genfuse.kernels).

`LLM`, `SamplingParams` and `Completion` are the public generation API, `Engine`,
`AsyncEngine`, `EngineArgs` and `RequestOutput` the serving engine's; they are imported on
first use so that loading this package stays cheap.
"""
__all__ = ["LLM", "SamplingParams", "Completion", "Engine", "AsyncEngine", "EngineArgs", "RequestOutput"]


def __getattr__(name):
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    if name in ("LLM", "Completion"):
        from . import llm

        return getattr(llm, name)
    if name in ("Engine", "AsyncEngine", "EngineArgs", "RequestOutput"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
