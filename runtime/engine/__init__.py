"""The serving engine: scheduler, KV cache manager, `Engine` and `AsyncEngine`."""
from .async_engine import AsyncEngine, EngineDeadError
from .engine import EngineArgs, Engine, EngineStats, RequestOutput
from .scheduler import Request, Scheduler, SchedulerOutput

__all__ = ["AsyncEngine", "Engine", "EngineArgs", "EngineDeadError", "EngineStats", "Request", "RequestOutput",
           "Scheduler", "SchedulerOutput"]
