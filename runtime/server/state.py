"""What the server's handlers share (`ServerState`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .metrics import ServerMetrics


@dataclass
class ServerState:
    """What the handlers share. ``engine`` (an `AsyncEngine`) is None while the model loads."""

    model_name: str
    api_key: str | None = None
    max_waiting: int | None = None
    request_timeout: float | None = None
    engine: object | None = None
    draining: bool = False
    awaiting_first_token: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    active: dict = field(default_factory=dict)  # engine request id -> True, for aborts at shutdown
    metrics: ServerMetrics | None = None

    def __post_init__(self):
        self.metrics = ServerMetrics(lambda: self.engine.stats if self.engine is not None else None,
                                     lambda: self.awaiting_first_token)
        self._tok_cache: dict[int, str] = {}

    def abort_all(self) -> int:
        """Abort every engine request in flight (shutdown); their consumers end with "abort"."""
        if self.engine is None:
            return 0
        for rid in list(self.active):
            self.engine.abort(rid)
        return len(self.active)

    def token_str(self, token_id: int) -> str:
        s = self._tok_cache.get(token_id)
        if s is None:
            tok = self.engine.engine.tokenizer
            s = tok.decode([token_id]) if tok is not None else str(token_id)
            self._tok_cache[token_id] = s
        return s
