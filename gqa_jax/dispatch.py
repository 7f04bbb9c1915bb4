"""The registry of attention implementations and the dispatch between them.

An implementation (`Implementation`) is a name, the platforms it runs on, a
priority, ``supports(request) -> None | reason`` and ``call(request)``. The
built-in ones are listed in `gqa_jax.implementations.BUILTIN`.

``implementation=None`` asks every implementation of the current platform,
highest priority first, and calls the first that supports the request. A
single name must support the request or the call fails with its reason; a
sequence of names is asked in the given order. Dispatch never catches an
exception from the implementation it called.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from gqa_jax.implementations import BUILTIN, Implementation
from gqa_jax.request import AttentionRequest

__all__ = ["Implementation", "current_platform", "implementations", "register_implementation", "run"]

_REGISTRY: dict[str, Implementation] = {impl.name: impl for impl in BUILTIN}


def _always(request: AttentionRequest) -> None:
    return None


def register_implementation(
    name: str,
    adapter: Callable[[AttentionRequest], Any],
    *,
    platforms: Sequence[str],
    priority: int = 0,
    supports: Callable[[AttentionRequest], str | None] | None = None,
) -> None:
    """Adds (or replaces) an implementation in the registry.

    Args:
      name: the ``implementation=`` string.
      adapter: ``adapter(request)`` serves an `AttentionRequest`: it returns
        ``[B, T, N, Hv]`` (and the ``[B, N, T, S]`` weights when
        ``request.return_weights``). Read the tensors and ``request.rules``
        (a `pallas_kernels.rules.Rules`), never re-validate.
      platforms: platforms it can run on (``"cpu"``, ``"gpu"``, ``"tpu"``).
      priority: higher is asked first by ``implementation=None``.
      supports: ``supports(request)`` returns None when ``adapter`` can serve
        the request, else the reason it cannot; default: serves everything.

    Raises:
      ValueError: for an empty name.
      TypeError: for an adapter or ``supports`` that is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"implementation name must be a non-empty string, got {name!r}")
    if not callable(adapter):
        raise TypeError(f"adapter must be callable, got {adapter!r}")
    if supports is not None and not callable(supports):
        raise TypeError(f"supports must be callable or None, got {supports!r}")
    _REGISTRY[name] = Implementation(name, tuple(platforms), priority, supports or _always, adapter)


def current_platform() -> str:
    """The platform dispatch picks for: ``jax.default_backend()``."""
    return jax.default_backend()


def implementations(platform: str | None = None) -> tuple[str, ...]:
    """Names registered for ``platform`` (default: the current one), in dispatch order."""
    platform = current_platform() if platform is None else platform
    found = [impl for impl in _REGISTRY.values() if platform in impl.platforms]
    return tuple(impl.name for impl in sorted(found, key=lambda impl: -impl.priority))


def _names(implementation) -> tuple[str, ...]:
    if implementation is None:
        return implementations(current_platform())
    if isinstance(implementation, str):
        return (implementation,)
    if isinstance(implementation, Sequence) and all(isinstance(name, str) for name in implementation):
        if not implementation:
            raise ValueError("implementation must be None, a name or a non-empty sequence of names, got ()")
        return tuple(implementation)
    raise TypeError(f"implementation must be None, a name or a sequence of names, got {implementation=}")


def _lookup(name: str) -> Implementation:
    if name not in _REGISTRY:
        raise ValueError(f"unknown implementation={name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def choose(request: AttentionRequest, implementation: str | Sequence[str] | None = None) -> Implementation:
    """The implementation that will serve ``request``.

    Args:
      request: a validated request.
      implementation: None (best for the platform), a name, or a sequence of
        names asked in order.

    Raises:
      ValueError: when no named implementation supports the request; the
        message holds each one's reason.
      TypeError: for an ``implementation`` that is not a name or names.
    """
    platform = current_platform()
    reasons = []
    for name in _names(implementation):
        impl = _lookup(name)
        if platform not in impl.platforms:
            reasons.append(f"{name}: runs on {list(impl.platforms)}, not on platform={platform!r}")
            continue
        reason = impl.supports(request)
        if reason is None:
            return impl
        reasons.append(f"{name}: {reason}")
    raise ValueError(f"implementation={implementation!r} cannot serve this call: " + "; ".join(reasons))


def run(request: AttentionRequest, implementation: str | Sequence[str] | None = None):
    """Serves ``request`` with `choose`'s implementation; its errors propagate."""
    return choose(request, implementation)(request)
