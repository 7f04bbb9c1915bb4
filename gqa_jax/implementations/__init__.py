"""The built-in implementations, one module per ``implementation=`` name.

`BUILTIN` is the one list dispatch registers; each module exports its
`Implementation` as ``IMPLEMENTATION``. A third-party implementation is added
with `gqa_jax.register_implementation` and follows the same protocol
(`gqa_jax.implementations._common.Implementation`): ``supports(request)``
returns None or the reason it cannot serve, then ``call(request)`` serves.
"""

from gqa_jax.implementations import cudnn, pallas_mosaic_gpu, pallas_tpu, pallas_triton, xla
from gqa_jax.implementations._common import Implementation

BUILTIN: tuple[Implementation, ...] = (
    pallas_mosaic_gpu.IMPLEMENTATION,
    pallas_triton.IMPLEMENTATION,
    pallas_tpu.IMPLEMENTATION,
    cudnn.IMPLEMENTATION,
    xla.IMPLEMENTATION,
)

__all__ = ["BUILTIN", "Implementation"]
