"""How a layer's ``flash_attention`` / ``implementation`` / ``attn_impl`` pick an implementation.

``flash_attention=None`` and ``implementation=None`` let dispatch choose (the
fastest implementation that serves the call, XLA last); ``flash_attention=False``
is the XLA path; ``flash_attention=True`` demands one of the fused
implementations registered for the platform (every one but ``"xla"``) and fails
with their reasons when none serves the call. A call that needs dropout or the
attention weights always has the XLA path to fall back on, so it never fails
for that reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from gqa_jax.dispatch import current_platform, implementations

# zeta / llm-foundry ``attn_impl`` names: "torch" is the plain einsum path; the
# fused ones prefer a fused kernel and fall back to XLA where none serves.
ZETA_ATTN_IMPL = {"torch": "xla", "flash": None, "triton": None}


def check_choice(flash_attention: bool | None, implementation) -> None:
    """Raises ``ValueError`` when both are given, or ``flash_attention`` is not a bool or None."""
    if flash_attention not in (None, True, False):
        raise ValueError(f"flash_attention must be None, True or False, got {flash_attention=}")
    if flash_attention is not None and implementation is not None:
        raise ValueError(f"give flash_attention or implementation, not both: got {flash_attention=}, {implementation=}")


def resolve_implementation(
    implementation: str | Sequence[str] | None,
    flash_attention: bool | None = None,
    *,
    needs_xla: bool = False,
):
    """The ``implementation=`` argument of `gqa_jax.dot_product_attention` for a layer.

    Args:
      implementation: the layer's ``implementation`` (None, a name, or names).
      flash_attention: Keras' flag (None, True or False).
      needs_xla: the call uses dropout or returns weights: the XLA path is
        appended as the last resort.

    Returns:
      None, a name, or a tuple of names.

    Raises:
      ValueError: ``flash_attention=True`` on a platform with no fused
        implementation (and no need for the XLA path).
    """
    check_choice(flash_attention, implementation)
    if flash_attention is False:
        names = ("xla",)
    elif flash_attention:
        names = tuple(name for name in implementations() if name != "xla")
        if not names and not needs_xla:
            raise ValueError(
                f"flash_attention=True needs a fused attention implementation, but platform="
                f"{current_platform()!r} has only {list(implementations())}; use flash_attention=None or False"
            )
    elif implementation is None:
        return None
    elif isinstance(implementation, str):
        names = (implementation,)
    else:
        names = tuple(implementation)
    if needs_xla and "xla" not in names:
        names += ("xla",)
    return names[0] if len(names) == 1 else names


def dispatch_kwargs(
    layer,
    *,
    dropout: float,
    deterministic: bool,
    return_weights: bool,
    implementation,
    flash_attention: bool | None = None,
    dropout_rng=None,
) -> dict:
    """Dropout, weights and implementation keywords of `gqa_jax.dot_product_attention`.

    When dropout is on (``dropout > 0`` and not ``deterministic``) the key is
    ``dropout_rng`` (an NNX layer draws it from its stream), or else drawn from
    the linen ``layer``'s ``"dropout"`` rng stream.
    """
    rate = 0.0 if deterministic else float(dropout)
    if rate > 0.0 and dropout_rng is None:
        dropout_rng = layer.make_rng("dropout")
    return {
        "dropout_rate": rate,
        "dropout_rng": dropout_rng if rate > 0.0 else None,
        "return_weights": bool(return_weights),
        "implementation": resolve_implementation(
            implementation, flash_attention, needs_xla=rate > 0.0 or bool(return_weights)
        ),
    }
