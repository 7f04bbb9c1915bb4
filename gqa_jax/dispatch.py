"""The registry of attention implementations and the dispatch between them.

An implementation is a name, the platforms it runs on, a priority and an
adapter ``adapter(request: AttentionRequest) -> output``. An adapter raises
``NotImplementedError`` (with the reason) for a request it cannot serve.

``implementation=None`` tries every implementation of the current platform,
highest priority first, and returns the first that serves the request. A
single name must serve the request or the call fails with the adapter's
reason; a tuple of names is tried in the given order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax

from gqa_jax.request import AttentionRequest

Adapter = Callable[[AttentionRequest], Any]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A registered implementation.

    Attributes:
      name: the string users pass as ``implementation=``.
      platforms: JAX platforms it runs on (``"cpu"``, ``"gpu"``, ``"tpu"``).
      priority: order among the implementations of a platform, highest first.
      adapter: serves an `AttentionRequest` or raises ``NotImplementedError``.
    """

    name: str
    platforms: tuple[str, ...]
    priority: int
    adapter: Adapter


_REGISTRY: dict[str, Implementation] = {}


def register_implementation(name: str, adapter: Adapter, *, platforms: Sequence[str], priority: int = 0) -> None:
    """Adds (or replaces) an implementation in the registry.

    Args:
      name: the ``implementation=`` string.
      adapter: callable taking an `AttentionRequest`.
      platforms: platforms it can run on.
      priority: higher is tried first by ``implementation=None``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"implementation name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = Implementation(name, tuple(platforms), priority, adapter)


def current_platform() -> str:
    """The platform dispatch picks for: ``jax.default_backend()``."""
    return jax.default_backend()


def implementations(platform: str | None = None) -> tuple[str, ...]:
    """Names registered for ``platform`` (default: the current one), in dispatch order."""
    platform = current_platform() if platform is None else platform
    found = [impl for impl in _REGISTRY.values() if platform in impl.platforms]
    return tuple(impl.name for impl in sorted(found, key=lambda impl: -impl.priority))


def _lookup(name: str) -> Implementation:
    if name not in _REGISTRY:
        raise ValueError(f"unknown implementation={name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def run(request: AttentionRequest, implementation: str | Sequence[str] | None = None):
    """Serves ``request`` with the first implementation that can.

    Args:
      request: a validated request.
      implementation: None (best for the platform), a name, or a sequence of
        names tried in order.

    Returns:
      What the chosen adapter returns.

    Raises:
      ValueError: when the named implementation(s) cannot serve the request;
        the message holds each one's reason.
    """
    platform = current_platform()
    if implementation is None:
        names = implementations(platform)
    elif isinstance(implementation, str):
        names = (implementation,)
    else:
        names = tuple(implementation)
        if not names:
            raise ValueError("implementation must be None, a name or a non-empty sequence of names, got ()")
    reasons = []
    for name in names:
        impl = _lookup(name)
        if platform not in impl.platforms:
            reasons.append(f"{name}: runs on {list(impl.platforms)}, not on platform={platform!r}")
            continue
        try:
            return impl.adapter(request)
        except NotImplementedError as e:
            reasons.append(f"{name}: {e}")
    raise ValueError(f"implementation={implementation!r} cannot serve this call: " + "; ".join(reasons))
