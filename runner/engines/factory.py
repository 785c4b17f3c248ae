"""Which engine a config asks for: its capabilities (plain data, so planning never imports torch) and the engine itself."""

from __future__ import annotations

from typing import Any

from runner.engines.base import Capabilities, Engine
from runner.schedulers import FLOW_SCHEDULERS, GENERATORS, SPEC_SCHEDULERS

LOCAL_CAPABILITIES = Capabilities(
    kind="local",
    schedulers=frozenset(GENERATORS + FLOW_SCHEDULERS),  # which of them a model takes is its family's (validate.py)
    not_applied={
        "enhance_prompt": "prompt enhancement is the provider's own model; the prompt is used as written",
        "multi_lingual": "no translation model is loaded; the prompt is used as written",
        "safety_checker": "no safety checker model is loaded",
        "tomesd": "token merging is not applied (no maintained tomesd library for diffusers 0.42)",
        "highres_fix": "high-res fix is not applied",
        "webhook": "the local engine has no webhook",
    },
)

# The provider runs every name of its list and honours its own fields.
REMOTE_CAPABILITIES = Capabilities(kind="remote", schedulers=frozenset(SPEC_SCHEDULERS), not_applied={})

CAPABILITIES = {"local": LOCAL_CAPABILITIES, "remote": REMOTE_CAPABILITIES}


def capabilities(kind: str) -> Capabilities:
    if kind not in CAPABILITIES:
        raise KeyError(kind)
    return CAPABILITIES[kind]


def create_engine(kind: str, *, keep_adapters: bool = False, **kwargs: Any) -> Engine:
    """Import and build an engine; torch is imported only here.

    keep_adapters: keep every LoRA loaded (a server, a search's trials) instead of dropping each after its last cell.
    """
    if kind == "local" and int(kwargs.get("workers") or 1) > 1:
        from runner.engines.ray_pool import RayPoolEngine

        return RayPoolEngine(keep_adapters=keep_adapters, **kwargs)
    if kind == "local":
        from runner.engines.local import LocalEngine

        return LocalEngine(keep_adapters=keep_adapters, **kwargs)
    if kind == "remote":
        from dataclasses import fields

        from runner.engines.remote import Policy, RemoteEngine

        policy = Policy(**{f.name: kwargs[f.name] for f in fields(Policy) if f.name in kwargs})
        return RemoteEngine(policy=policy, keep_adapters=keep_adapters, **kwargs)
    raise KeyError(kind)
