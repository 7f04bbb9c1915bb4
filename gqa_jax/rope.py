"""Rotary position embeddings (RoPE), in the half-split convention of Llama-family checkpoints.

A head vector ``x`` of even size ``H`` is split into halves ``x1 = x[:H/2]``,
``x2 = x[H/2:]``; pair ``i`` (``x1[i]``, ``x2[i]``) is rotated by the angle
``position * theta ** (-2i / H)``::

    out = x * cos + rotate_half(x) * sin,   rotate_half(x) = concat(-x2, x1)

which is what Hugging Face ``LlamaAttention`` (``apply_rotary_pos_emb``) does,
so its ``q_proj``/``k_proj`` weights load without permutation. Because every
pair turns by an angle proportional to its position, the dot product of a
rotated query and a rotated key depends only on their position difference.

The same function serves queries ``[B, T, N, H]`` and keys ``[B, T, K, H]``:
the head axis is left alone.

`RotaryEmbedding` bundles the settings of a checkpoint: ``theta``, partial
rotary (only the first ``rotary_dim`` features of each head turn, the rest
pass through, as GPT-NeoX / Phi / StableLM), and a frequency scaling
(`LinearRopeScaling`, `Llama3RopeScaling`), with `RotaryEmbedding.from_hf`
reading them from a Hugging Face config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "Llama3RopeScaling",
    "LinearRopeScaling",
    "RotaryEmbedding",
    "apply_rope",
    "rope_frequencies",
]


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Array:
    """Angular frequency of each rotated pair: float32 ``[H/2]``, ``theta ** (-2i / H)``.

    Raises:
      ValueError: if ``head_dim`` is not a positive even int or ``theta <= 1``.
    """
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int for rotary embeddings, got {head_dim=}")
    if not theta > 1.0:
        raise ValueError(f"theta must be > 1, got {theta=}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """Position interpolation: every frequency divided by ``factor`` (Hugging Face ``rope_type="linear"``).

    Attributes:
      factor: how many times longer the context is than in pre-training.
    """

    factor: float

    def __post_init__(self):
        _positive("factor", self.factor)

    def scale_frequencies(self, frequencies: Array) -> Array:
        """The scaled ``[H/2]`` frequencies."""
        return frequencies / self.factor


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's long-context frequencies (Hugging Face ``rope_type="llama3"``).

    Wavelengths shorter than ``original_max_position_embeddings /
    high_freq_factor`` are kept, those longer than ``original_max_position_embeddings
    / low_freq_factor`` are divided by ``factor``, and the ones between blend the
    two linearly in ``original_max_position_embeddings / wavelength``.

    Attributes:
      factor: frequency divisor of the long wavelengths (8 in Llama 3.1).
      low_freq_factor: 1 in Llama 3.1.
      high_freq_factor: 4 in Llama 3.1; must exceed ``low_freq_factor``.
      original_max_position_embeddings: pre-training context (8192 in Llama 3.1).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _positive(field.name, getattr(self, field.name))
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor must exceed low_freq_factor, got high_freq_factor={self.high_freq_factor} "
                f"and low_freq_factor={self.low_freq_factor}"
            )

    def scale_frequencies(self, frequencies: Array) -> Array:
        """The scaled ``[H/2]`` frequencies."""
        context = self.original_max_position_embeddings
        wavelength = 2 * math.pi / frequencies
        smooth = (context / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        blended = (1 - smooth) * frequencies / self.factor + smooth * frequencies
        scaled = jnp.where(wavelength > context / self.low_freq_factor, frequencies / self.factor, blended)
        return jnp.where(wavelength < context / self.high_freq_factor, frequencies, scaled)


_HF_SCALINGS = {"linear": LinearRopeScaling, "llama3": Llama3RopeScaling}


def _field(config, name, default=None):
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
    """The rotary embedding of a checkpoint, applied to queries and keys by `apply`.

    Attributes:
      theta: base of the frequencies (``rope_theta``), > 1.
      rotary_dim: partial rotary: only the first ``rotary_dim`` (even) features
        of each head turn, with frequencies ``theta ** (-2i / rotary_dim)``; the
        rest pass through unchanged. ``None``: the whole head.
      scaling: ``None``, `LinearRopeScaling` or `Llama3RopeScaling`.

    Example::

        rng = np.random.default_rng(0)
        q_BTNH = rng.standard_normal((2, 5, 8, 64), np.float32)
        k_BTKH = rng.standard_normal((2, 5, 2, 64), np.float32)
        positions_BT = jnp.array([[0], [3]]) + jnp.arange(5)    # row 1 starts at position 3
        rope = RotaryEmbedding(theta=500000.0, scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192))
        q_BTNH = rope.apply(q_BTNH, positions_BT)
        k_BTKH = rope.apply(k_BTKH, positions_BT)
    """

    theta: float = 10000.0
    rotary_dim: int | None = None
    scaling: LinearRopeScaling | Llama3RopeScaling | None = None

    def __post_init__(self):
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not self.theta > 1.0:
            raise ValueError(f"theta must be a number > 1, got theta={self.theta!r}")
        if self.rotary_dim is not None and (
            not isinstance(self.rotary_dim, int) or self.rotary_dim < 2 or self.rotary_dim % 2
        ):
            raise ValueError(f"rotary_dim must be None or a positive even int, got rotary_dim={self.rotary_dim!r}")
        if self.scaling is not None and not isinstance(self.scaling, tuple(_HF_SCALINGS.values())):
            raise TypeError(
                f"scaling must be None, LinearRopeScaling or Llama3RopeScaling, got {type(self.scaling).__name__}"
            )

    def frequencies(self, head_dim: int) -> Array:
        """Float32 ``[R/2]`` angular frequencies for heads of ``head_dim`` features (``R = rotary_dim or H``).

        Raises:
          ValueError: if ``rotary_dim > head_dim``, or ``R`` is odd.
        """
        rotary_dim = head_dim if self.rotary_dim is None else self.rotary_dim
        if rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be <= head_dim, got rotary_dim={rotary_dim} and head_dim={head_dim}")
        frequencies = rope_frequencies(rotary_dim, self.theta)
        return frequencies if self.scaling is None else self.scaling.scale_frequencies(frequencies)

    def apply(self, x: Array, positions) -> Array:
        """Rotates the first ``rotary_dim`` features of each head vector of ``x`` by its token's position.

        Args:
          x: queries ``[B, T, N, H]`` or keys ``[B, T, K, H]``.
          positions: int ``[B, T]`` position of every token, or ``[T]`` shared
            by all rows.

        Returns:
          The rotated array, same shape and dtype as ``x``; angles and rotation
          in float32.

        Raises:
          ValueError: for wrong ranks or shapes, an odd rotated size or
            ``rotary_dim > H``.
          TypeError: for non-integer positions.
        """
        x_BTNH = jnp.asarray(x)
        if x_BTNH.ndim != 4:
            raise ValueError(f"x must have rank 4 [B,T,N,H], got x.shape={tuple(x_BTNH.shape)}")
        B, T, _, H = x_BTNH.shape
        positions_BT = _positions_BT(positions, B, T, x_BTNH.shape)
        frequencies = self.frequencies(H)
        R = 2 * frequencies.shape[0]
        angles = positions_BT.astype(jnp.float32)[:, :, None] * frequencies  # [B|1, T, R/2]
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B|1, T, 1, R]
        x_f32 = x_BTNH.astype(jnp.float32)
        x_rot, x_pass = x_f32[..., :R], x_f32[..., R:]
        x1, x2 = jnp.split(x_rot, 2, axis=-1)
        rotated = x_rot * jnp.cos(angles) + jnp.concatenate([-x2, x1], axis=-1) * jnp.sin(angles)
        return jnp.concatenate([rotated, x_pass], axis=-1).astype(x_BTNH.dtype)

    @classmethod
    def from_hf(cls, config, *, head_dim: int | None = None) -> RotaryEmbedding:
        """The rotary embedding of a Hugging Face config (``transformers`` config, its dict, or ``rope_scaling``).

        Reads ``rope_theta``, ``partial_rotary_factor``, ``head_dim`` (else
        ``hidden_size // num_attention_heads``) and the scaling from
        ``rope_scaling`` or ``rope_parameters`` (transformers 5), whose
        ``rope_type`` (or legacy ``type``) must be ``"default"``, ``"linear"``
        or ``"llama3"``. A bare ``rope_scaling`` dict (with a ``rope_type``) is
        read as the scaling of a ``theta=10000`` full rotary.

        Args:
          config: the config (object with attributes, or a mapping).
          head_dim: the head size, when the config does not give it (needed
            only for ``partial_rotary_factor != 1``).

        Raises:
          ValueError: for an unsupported ``rope_type`` (named with the
            supported ones), a missing scaling field, or a partial rotary
            without a head size.
        """
        if isinstance(config, Mapping) and ("rope_type" in config or "type" in config):
            config = {"rope_scaling": config}
        rope = _field(config, "rope_scaling") or _field(config, "rope_parameters") or {}
        if not isinstance(rope, Mapping):
            raise TypeError(f"rope_scaling must be a dict, got {type(rope).__name__}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default" and kind not in _HF_SCALINGS:
            raise ValueError(
                f"rope_type={kind!r} is not supported: only 'default', {', '.join(map(repr, _HF_SCALINGS))}"
            )
        scaling = None
        if kind in _HF_SCALINGS:
            scaling_cls = _HF_SCALINGS[kind]
            names = [field.name for field in dataclasses.fields(scaling_cls)]
            missing = [name for name in names if rope.get(name) is None]
            if missing:
                raise ValueError(f"rope_scaling of rope_type={kind!r} lacks {missing}, got rope_scaling={dict(rope)}")
            scaling = scaling_cls(**{name: rope[name] for name in names})
        theta = _field(config, "rope_theta") or rope.get("rope_theta", 10000.0)
        fraction = _field(config, "partial_rotary_factor") or rope.get("partial_rotary_factor", 1.0)
        rotary_dim = None
        if fraction != 1.0:
            head_dim = head_dim or _field(config, "head_dim")
            if head_dim is None and _field(config, "hidden_size") and _field(config, "num_attention_heads"):
                head_dim = _field(config, "hidden_size") // _field(config, "num_attention_heads")
            if head_dim is None:
                raise ValueError(f"partial_rotary_factor={fraction} needs head_dim, got neither it nor hidden_size")
            rotary_dim = int(head_dim * fraction)
        return cls(theta=float(theta), rotary_dim=rotary_dim, scaling=scaling)


def _positions_BT(positions, B: int, T: int, x_shape) -> Array:
    positions_BT = jnp.asarray(positions)
    if not jnp.issubdtype(positions_BT.dtype, jnp.integer):
        raise TypeError(f"positions must be an integer array, got positions.dtype={positions_BT.dtype}")
    if positions_BT.ndim == 1:
        positions_BT = positions_BT[None, :]
    if positions_BT.ndim != 2 or positions_BT.shape[1] != T or positions_BT.shape[0] not in (1, B):
        raise ValueError(
            f"positions must have shape [B,T]=({B}, {T}) or [T]=({T},), got "
            f"positions.shape={tuple(jnp.shape(positions))} for x.shape={tuple(x_shape)}"
        )
    return positions_BT


def apply_rope(x: Array, positions, *, theta: float = 10000.0) -> Array:
    """Rotates each head vector of ``x`` by its token's position (``RotaryEmbedding(theta).apply``).

    Args:
      x: queries ``[B, T, N, H]`` or keys ``[B, T, K, H]``; ``H`` even.
      positions: int ``[B, T]`` position of every token (per row, so ragged
        and cached batches work), or ``[T]`` shared by all rows.
      theta: the base of the frequencies (``rope_theta`` in Llama configs).

    Returns:
      The rotated array, same shape and dtype as ``x``. The angles and the
      rotation are computed in float32.

    Raises:
      ValueError: for wrong ranks or shapes, odd ``H`` or ``theta <= 1``.
      TypeError: for non-integer positions.

    Example::

        B, T = 2, 3
        rng = np.random.default_rng(0)
        q = rng.standard_normal((B, T, 8, 64), np.float32)       # [B, T, N, H]
        k = rng.standard_normal((B, T, 2, 64), np.float32)       # [B, T, K, H]
        lengths = jnp.array([5, 2])                               # tokens already cached per row
        positions = lengths[:, None] + jnp.arange(T)              # [B, T]
        q = apply_rope(q, positions, theta=500000.0)
        k = apply_rope(k, positions, theta=500000.0)
    """
    if not theta > 1.0:
        raise ValueError(f"theta must be > 1, got {theta=}")
    return RotaryEmbedding(theta=float(theta)).apply(x, positions)
