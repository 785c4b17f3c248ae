"""The remote client's timeouts and retries: plain data, shared by the config schema and the client."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Policy:
    """Timeouts and retries; seconds. Tests shrink them, users rarely need to."""

    request_timeout_s: float = 60.0
    deadline_s: float = 300.0
    eta_min_s: float = 1.0
    eta_max_s: float = 10.0
    poll_initial_s: float = 3.0
    poll_max_s: float = 10.0
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 80.0
    max_rate_limit_retries: int = 8
    max_transient_retries: int = 5
