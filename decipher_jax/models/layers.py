"""Parameters with logical axes, LayerNorm, and the transformer stack shared by ViT and BERT.

The stack stores every per-layer parameter with a leading ``layers`` axis. One layout serves
both execution modes: ``scan=True`` runs ``jax.lax.scan`` over the layers (compile time
independent of depth), ``scan=False`` unrolls a Python loop over slices. Checkpoints are thus
identical whichever mode trained them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax.sharding import DEFAULT_RULES, Rules, constrain

trunc_normal = jax.nn.initializers.truncated_normal(stddev=0.02)
normal = jax.nn.initializers.normal(stddev=0.02)
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute cheap elementwise ops: a good TPU default.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param(key, init, shape: Sequence[int], axes: Sequence[str | None], dtype=jnp.float32) -> nnx.Param:
    """An ``nnx.Param`` carrying logical axis names for the sharding rules."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {tuple(axes)} differ in rank")
    return nnx.Param(init(key, shape, dtype), logical_axes=tuple(axes))


def _standardise(x, axes, scale, bias, eps: float):
    """``x`` centred and scaled over ``axes``, then the affine; in float32, cast back."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axes, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm computed in float32 and cast back to the input dtype."""
    return _standardise(x, -1, scale, bias, eps)


def instance_norm(x, scale, bias, eps: float = 1e-5, axes=(1, 2, 3)):
    """Each channel of each sample standardised over the spatial axes of ``(B, D, H, W, C)`` (or
    the token axis of ``(B, N, C)`` with ``axes=(1,)``), then a per-channel affine; in float32. A
    pure function of one sample (no batch statistics), yet per channel: the property that makes
    small lesions learnable (BENCHMARKS.md, "The conv stem")."""
    return _standardise(x, axes, scale, bias, eps)


def conv3d(x, kernel, strides: Sequence[int], impl: str = "auto"):
    """A 3D convolution, channels last: ``x (B, D, H, W, C)``, ``kernel (kd, kh, kw, C, O)`` with odd
    sizes, zero padding of ``k // 2`` on both sides (PyTorch / MONAI ``padding=k//2``), output
    ``ceil(size / stride)`` per axis.

    ``impl``: ``"xla"`` is ``lax.conv_general_dilated``; ``"im2col"`` gathers the ``kd*kh*kw``
    shifted strided views and contracts them in one matmul, 18-60x faster forward + backward
    under XLA:CPU, whose 3D convolutions are slow (BENCHMARKS.md); ``"auto"`` takes im2col on the
    CPU and XLA's convolution on accelerators, where im2col would cost ``kd*kh*kw`` times the
    input's memory."""
    ks = kernel.shape[:3]
    if any(k % 2 == 0 for k in ks):
        raise ValueError(f"conv3d needs odd kernel sizes, got {ks}")
    strides = tuple(int(s) for s in strides)
    pads = tuple((k // 2, k // 2) for k in ks)
    if impl == "auto":
        impl = "im2col" if jax.default_backend() == "cpu" else "xla"
    if impl == "xla":
        return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), strides, pads,
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    if impl != "im2col":
        raise ValueError(f"conv3d impl must be 'auto', 'xla' or 'im2col', got {impl!r}")
    b, *spatial, c = x.shape
    out = [-(-n // s) for n, s in zip(spatial, strides)]
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    cols = [xp[:, i: i + (out[0] - 1) * strides[0] + 1: strides[0],
               j: j + (out[1] - 1) * strides[1] + 1: strides[1],
               k: k + (out[2] - 1) * strides[2] + 1: strides[2]]
            for i in range(ks[0]) for j in range(ks[1]) for k in range(ks[2])]
    cols = jnp.stack(cols, axis=-2)  # (B, d, h, w, taps, C)
    return jnp.einsum("bdhwtc,tco->bdhwo", cols, kernel.reshape(-1, c, kernel.shape[-1]).astype(x.dtype))


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


@dataclasses.dataclass(frozen=True)
class StackConfig:
    num_layers: int
    dim: int
    heads: int
    mlp_dim: int
    qkv_bias: bool = True
    pre_norm: bool = True  # ViT: pre-LN; BERT: post-LN.
    ln_eps: float = 1e-6
    layerscale: float | None = None  # DINOv2's LayerScale init (1e-5); None disables it.
    dtype: str = "float32"  # compute dtype; parameters stay param_dtype.
    param_dtype: str = "float32"
    remat: str = "none"
    scan: bool = False
    attention_impl: str | None = None  # None / "xla" / "cudnn" for jax.nn.dot_product_attention.
    kernel_init: str = "trunc_normal"  # BERT initialises with a plain normal(0.02).
    gelu_approximate: bool = False  # exact erf GELU (BERT, MONAI, DINOv2); True for "gelu_new".

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


# name -> (shape fn, logical axes, initialiser); "k" marks kernels.
def _param_table(c: StackConfig):
    L, E, H, D, M = c.num_layers, c.dim, c.heads, c.head_dim, c.mlp_dim
    k = trunc_normal if c.kernel_init == "trunc_normal" else normal
    t = {
        "ln1_scale": ((L, E), ("layers", "norm"), ones),
        "ln1_bias": ((L, E), ("layers", "norm"), zeros),
        "qkv_kernel": ((L, E, 3, H, D), ("layers", "embed", "qkv", "heads", "kv"), k),
        "out_kernel": ((L, H, D, E), ("layers", "heads", "kv", "embed"), k),
        "out_bias": ((L, E), ("layers", "norm"), zeros),
        "ln2_scale": ((L, E), ("layers", "norm"), ones),
        "ln2_bias": ((L, E), ("layers", "norm"), zeros),
        "mlp_in_kernel": ((L, E, M), ("layers", "embed", "mlp"), k),
        "mlp_in_bias": ((L, M), ("layers", "mlp"), zeros),
        "mlp_out_kernel": ((L, M, E), ("layers", "mlp", "embed"), k),
        "mlp_out_bias": ((L, E), ("layers", "norm"), zeros),
    }
    if c.qkv_bias:
        t["qkv_bias"] = ((L, 3, H, D), ("layers", "qkv", "heads", "kv"), zeros)
    if c.layerscale is not None:
        ls = jax.nn.initializers.constant(c.layerscale)
        t["ls1"] = ((L, E), ("layers", "norm"), ls)
        t["ls2"] = ((L, E), ("layers", "norm"), ls)
    return t


class TransformerStack(nnx.Module):
    """``num_layers`` transformer blocks with stacked parameters.

    ``__call__(x, mask=None, collect=(), drop_path=0., key=None)`` returns
    ``(x, {i: output of block i})`` for the 0-based block indices in ``collect``
    (MONAI's ``hidden_states_out[i]``, before any final norm).
    """

    def __init__(self, config: StackConfig, *, rngs: nnx.Rngs, rules: Rules = DEFAULT_RULES):
        self.config = config
        self.rules = rules
        self.names = tuple(sorted(_param_table(config)))
        pdt = jnp.dtype(config.param_dtype)
        for name, (shape, axes, init) in _param_table(config).items():
            setattr(self, name, param(rngs.params(), init, shape, axes, pdt))

    def params(self) -> dict[str, jax.Array]:
        return {n: getattr(self, n)[...] for n in self.names}

    def __call__(self, x, *, mask=None, collect: Sequence[int] = (), drop_path: float = 0.0, key=None):
        c, rules = self.config, self.rules
        L = c.num_layers
        collect = tuple(sorted({int(i) % L for i in collect}))
        if drop_path > 0.0 and key is None:
            raise ValueError("drop_path > 0 needs a PRNG key")
        # Stochastic depth rate grows linearly with depth (DINOv2 / timm convention).
        rates = jnp.linspace(0.0, drop_path, L) if L > 1 else jnp.full((1,), drop_path)
        dtype = jnp.dtype(c.dtype)
        params = self.params()
        x = x.astype(dtype)

        def body(h, inputs):
            p, idx, rate = inputs
            k = None if key is None else jax.random.fold_in(key, idx)
            h = _block(p, h, mask, c, rules, rate if drop_path > 0.0 else None, k)
            return h, (h if collect else None)

        policy = REMAT_POLICIES[c.remat]
        if c.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=not c.scan)

        if c.scan:
            x, ys = jax.lax.scan(body, x, (params, jnp.arange(L), rates))
            hidden = {i: ys[i] for i in collect}
        else:
            hidden = {}
            # One unstack per parameter, not L slices: the transpose of a slice is a pad to the
            # whole stack, and XLA:CPU then sums L padded copies of every gradient, inside each
            # optimiser update that consumes it (656 against 367 ms for the ViT-S/16 step at 64^3;
            # BENCHMARKS.md, "Training step"). The transpose of an unstack is one stack.
            per_layer = {n: jnp.unstack(v) for n, v in params.items()}
            for i in range(L):
                p_i = {n: v[i] for n, v in per_layer.items()}
                x, _ = body(x, (p_i, jnp.asarray(i), rates[i]))
                if i in collect:
                    hidden[i] = x
        return x, hidden


def _drop_path(y, rate, key):
    """Per-sample stochastic depth on a residual branch (identity when rate is None)."""
    if rate is None:
        return y
    keep = jax.random.bernoulli(key, 1.0 - rate, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(keep, y / jnp.maximum(1.0 - rate, 1e-6).astype(y.dtype), 0).astype(y.dtype)


def _block(p, x, mask, c: StackConfig, rules: Rules, rate, key):
    dtype = x.dtype
    w = {n: (v if n.startswith("ln") else v.astype(dtype)) for n, v in p.items()}
    act = ("act_batch", "act_len", "act_embed")

    def attention(h):
        qkv = jnp.einsum("bte,ecnd->cbtnd", h, w["qkv_kernel"])
        if "qkv_bias" in w:
            qkv = qkv + w["qkv_bias"][:, None, None]
        q, k, v = (constrain(t, ("act_batch", "act_len", "act_heads", None), rules) for t in qkv)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=c.attention_impl)
        return jnp.einsum("btnd,nde->bte", o, w["out_kernel"]) + w["out_bias"]

    def mlp(h):
        h = jnp.einsum("bte,em->btm", h, w["mlp_in_kernel"]) + w["mlp_in_bias"]
        h = constrain(jax.nn.gelu(h, approximate=c.gelu_approximate), ("act_batch", "act_len", "act_mlp"), rules)
        return jnp.einsum("btm,me->bte", h, w["mlp_out_kernel"]) + w["mlp_out_bias"]

    ln = lambda h, i: layer_norm(h, p[f"ln{i}_scale"], p[f"ln{i}_bias"], c.ln_eps)  # noqa: E731
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    if c.pre_norm:
        a = attention(ln(x, 1))
        if "ls1" in w:
            a = a * w["ls1"]
        x = constrain(x + _drop_path(a, rate, k1), act, rules)
        m = mlp(ln(x, 2))
        if "ls2" in w:
            m = m * w["ls2"]
        x = constrain(x + _drop_path(m, rate, k2), act, rules)
    else:
        x = ln(x + _drop_path(attention(x), rate, k1), 1)
        x = constrain(ln(x + _drop_path(mlp(x), rate, k2), 2), act, rules)
    return x
