"""`EinsumDense` (linen and NNX) on an explicit-sharding (2, 2) mesh (4 simulated CPU devices).

In a subprocess (the device count is fixed when jax starts), under
``jax.set_mesh`` with ``AxisType.Explicit`` axes: heads and output
projections of batch-sharded inputs with head-sharded kernels, for inputs
with two leading axes (``[B, T, D]``), one, and three. Forward and gradients
(inputs and parameters) equal a float64 NumPy einsum, and the outputs keep
the batch (and head) sharding in their types.
"""

from __future__ import annotations

import textwrap

from tests.multidevice import run_on_cpu_devices

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import AxisType, PartitionSpec as P
    from gqa_jax.modules.einsum_dense import EinsumDense
    from gqa_jax.nnx.einsum_dense import EinsumDense as NnxEinsumDense

    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    rng = np.random.default_rng(0)
    D, N, H = 8, 4, 6
    w_heads, b_heads = rng.standard_normal((D, N, H)), rng.standard_normal((N, H))
    w_out, b_out = rng.standard_normal((N, H, D)), rng.standard_normal((D,))
    specs = {"kernel": {"heads": P(None, "model", None), "output": P("model", None, None)},
             "bias": {"heads": P("model", None), "output": P()}}

    def reference(x, ct_heads, ct_out):
        # y = x.w + b, z = y.w_out + b_out; loss = <y, ct_heads> + <z, ct_out>; float64, leading axes flattened.
        lead = x.shape[:-1]
        x, ct_heads, ct_out = x.reshape(-1, D), ct_heads.reshape(-1, N, H), ct_out.reshape(-1, D)
        y = np.einsum("bd,dnh->bnh", x, w_heads) + b_heads
        z = np.einsum("bnh,nhd->bd", y, w_out) + b_out
        g_y = ct_heads + np.einsum("bd,nhd->bnh", ct_out, w_out)
        grads = {"x": np.einsum("bnh,dnh->bd", g_y, w_heads).reshape(lead + (D,)),
                 "heads": {"kernel": np.einsum("bd,bnh->dnh", x, g_y), "bias": g_y.sum(0)},
                 "output": {"kernel": np.einsum("bnh,bd->nhd", y, ct_out), "bias": ct_out.sum(0)}}
        return y.reshape(lead + (N, H)), z.reshape(lead + (D,)), grads

    def check(what, got, want, spec=None):
        err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
        assert err < 1e-4, (what, err)
        if spec is not None:
            assert jax.typeof(got).sharding.spec[:len(spec)] == spec, (what, jax.typeof(got))

    def linen_loss(params, x, ct_heads, ct_out):
        y = EinsumDense(features=(N, H)).apply({"params": params["heads"]}, x)
        z = EinsumDense(features=(D,), contract=2).apply({"params": params["output"]}, y)
        return jnp.sum(y * ct_heads) + jnp.sum(z * ct_out), (y, z)

    class Pair(nnx.Module):
        def __init__(self):
            self.heads = NnxEinsumDense((D,), (N, H), rngs=nnx.Rngs(0))
            self.output = NnxEinsumDense((N, H), (D,), rngs=nnx.Rngs(1))

    def nnx_loss(pair, x, ct_heads, ct_out):
        y = pair.heads(x)
        z = pair.output(y)
        return jnp.sum(y * ct_heads) + jnp.sum(z * ct_out), (y, z)

    with jax.set_mesh(mesh):
        put = lambda w, spec: jax.device_put(jnp.asarray(w, jnp.float32), spec)
        params = {layer: {name: put(w, specs[name][layer]) for name, w in weights.items()}
                  for layer, weights in (("heads", {"kernel": w_heads, "bias": b_heads}),
                                         ("output", {"kernel": w_out, "bias": b_out}))}
        pair = Pair()
        nnx.update(pair, params)
        for lead in ((4, 5), (5,), (2, 4, 3)):
            x = rng.standard_normal(lead + (D,))
            ct_heads, ct_out = rng.standard_normal(lead + (N, H)), rng.standard_normal(lead + (D,))
            y_ref, z_ref, g_ref = reference(x, ct_heads, ct_out)
            batch = P("data") if len(lead) > 1 else P()
            args = [put(a, batch) for a in (x, ct_heads, ct_out)]
            heads_spec = (batch[0] if len(batch) else None,) + (None,) * (len(lead) - 1) + ("model",)
            (_, (y, z)), (g_params, g_x) = jax.jit(jax.value_and_grad(linen_loss, argnums=(0, 1), has_aux=True))(
                params, *args)
            (_, (y2, z2)), (g_pair, g_x2) = nnx.jit(nnx.value_and_grad(nnx_loss, argnums=(0, 1), has_aux=True))(
                pair, *args)
            g_pair = nnx.to_pure_dict(g_pair)
            for api, y_, z_, gp, gx in (("linen", y, z, g_params, g_x), ("nnx", y2, z2, g_pair, g_x2)):
                check(f"{api} {lead} heads", y_, y_ref, heads_spec)
                check(f"{api} {lead} output", z_, z_ref, heads_spec[:1])
                check(f"{api} {lead} dx", gx, g_ref["x"])
                for layer in ("heads", "output"):
                    for name in ("kernel", "bias"):
                        check(f"{api} {lead} d{layer}/{name}", gp[layer][name], g_ref[layer][name])
            print("ok", lead)
""")


def test_einsum_dense_forward_and_grad_on_an_explicit_mesh():
    result = run_on_cpu_devices(SCRIPT, 4)
    assert result.stdout.count("ok ") == 3, result.stdout
