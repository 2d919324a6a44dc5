"""A causal decoder language model in Flax NNX, in the two layouts Hugging Face checkpoints use:
GPT-2 (learned positions, LayerNorm, GELU-tanh MLP, biases) and Llama (RoPE, RMSNorm, SwiGLU,
grouped-query attention, no biases). Weights are converted by :mod:`decipher_jax.interop.hf_decoder`.

Inputs are embeddings, not ids, so that image tokens can stand before the text as a prefix (the
M3D / RadFM / Merlin layout: no cross-attention)::

    x = model.embed(ids)                                    # (B, T, E)
    x = jnp.concatenate([prefix, x], axis=1)                # image tokens first
    logits, cache = model(x, valid=valid)                   # causal over the valid slots
    logits, cache = model(x1, valid=valid1, cache=cache)    # one more token, through the KV cache

``valid`` (B, T) marks the real slots: a left-padded prompt's pads are never attended to, and the
positions (learned or rotary) count only valid slots, so a padded row decodes as it would alone.
A KV cache holds every layer's keys and values for ``max_len`` slots plus which slots are
valid; a call writes its ``T`` slots at ``cache["index"]`` and attends to every valid slot up to
its own. Without a cache a call attends to its own input only (training, and the reference
against which the cache is tested).

Parameters are stacked over layers (one layout for ``scan`` and the unrolled loop, as the
encoders) and carry logical axis names for the sharding rules.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax.models.layers import REMAT_POLICIES, layer_norm, normal, ones, param, zeros
from decipher_jax.sharding import DEFAULT_RULES, Rules, constrain

FAMILIES = ("gpt2", "llama")
_ACT = ("act_batch", "act_len", "act_embed")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    family: str = "gpt2"  # gpt2 | llama: the block's layout (see the module docstring)
    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None  # grouped-query attention (Llama); None: num_heads
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int | None = None  # None: 4 * hidden_size
    max_position: int = 1024  # learned positions (gpt2); rope only bounds nothing
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3's frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_position).
    rope_llama3: tuple[float, float, float, int] | None = None
    attention_bias: bool | None = None  # None: the family's (gpt2 True, llama False)
    mlp_bias: bool | None = None
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan: bool = False
    attention_impl: str | None = None  # jax.nn.dot_product_attention's implementation
    # LoRA (Hu et al. 2021): W + (alpha / rank) A B on the ``lora_targets`` projections; B starts at
    # zero, so a fresh adapter changes nothing. Freeze the rest with an optimiser rule (configs:
    # ``("decoder/(?!.*_lora_).*", None)``): it then has no optimiser state, the point of LoRA.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"num_heads {self.heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.family == "llama" and self.dim_head % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.dim_head}")
        known = {"q", "k", "v", "o", "up", "down"} | ({"gate"} if self.family == "llama" else set())
        if self.lora_rank and set(self.lora_targets) - known:
            raise ValueError(f"lora_targets {sorted(set(self.lora_targets) - known)} are not projections of a "
                             f"{self.family} block ({sorted(known)})")

    @property
    def heads(self) -> int:
        return self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def has_attention_bias(self) -> bool:
        return self.family == "gpt2" if self.attention_bias is None else self.attention_bias

    @property
    def has_mlp_bias(self) -> bool:
        return self.family == "gpt2" if self.mlp_bias is None else self.mlp_bias


def rope_frequencies(c: DecoderConfig) -> jax.Array:
    """The rotary inverse frequencies ``(head_dim / 2,)``, with Llama 3's scaling when configured
    (transformers' ``_compute_llama3_parameters``: long wavelengths divided by ``factor``, short
    ones kept, a smooth blend between)."""
    d = c.dim_head
    inv = 1.0 / (c.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if c.rope_llama3 is None:
        return inv
    factor, low, high, original = c.rope_llama3
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def apply_rope(x, positions, inv_freq):
    """HF's rotate-half convention: pairs ``(i, i + d/2)``. ``x (B, T, N, D)``, ``positions (B, T)``."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def rms_norm(x, scale, eps: float):
    """Llama's RMSNorm, in float32 (as transformers' ``LlamaRMSNorm``), cast back."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def positions_from_valid(valid, offset=None):
    """Each slot's position: the number of valid slots before it (plus ``offset``, the count
    already in a cache), so left padding does not shift a row's positions."""
    pos = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
    if offset is not None:
        pos = pos + offset[:, None]
    return jnp.maximum(pos, 0)


def _param_table(c: DecoderConfig):
    L, E, H, K, D, M = c.num_layers, c.hidden_size, c.heads, c.kv_heads, c.dim_head, c.mlp_dim
    t = {
        "ln1_scale": ((L, E), ("layers", "norm"), ones),
        "q_kernel": ((L, E, H, D), ("layers", "embed", "heads", "kv"), normal),
        "k_kernel": ((L, E, K, D), ("layers", "embed", "heads", "kv"), normal),
        "v_kernel": ((L, E, K, D), ("layers", "embed", "heads", "kv"), normal),
        "o_kernel": ((L, H, D, E), ("layers", "heads", "kv", "embed"), normal),
        "ln2_scale": ((L, E), ("layers", "norm"), ones),
        "down_kernel": ((L, M, E), ("layers", "mlp", "embed"), normal),
        "up_kernel": ((L, E, M), ("layers", "embed", "mlp"), normal),
    }
    if c.family == "gpt2":
        t["ln1_bias"] = ((L, E), ("layers", "norm"), zeros)
        t["ln2_bias"] = ((L, E), ("layers", "norm"), zeros)
    else:
        t["gate_kernel"] = ((L, E, M), ("layers", "embed", "mlp"), normal)
    if c.has_attention_bias:
        t["q_bias"] = ((L, H, D), ("layers", "heads", "kv"), zeros)
        t["k_bias"] = ((L, K, D), ("layers", "heads", "kv"), zeros)
        t["v_bias"] = ((L, K, D), ("layers", "heads", "kv"), zeros)
        t["o_bias"] = ((L, E), ("layers", "norm"), zeros)
    if c.lora_rank:
        r = c.lora_rank
        for n in c.lora_targets:
            shape, axes, _ = t[f"{n}_kernel"]
            # A: the kernel's input axes to the rank (axes as the kernel's); B: the rank to its output axes.
            n_in = 2 if n == "o" else 1
            t[f"{n}_lora_a"] = ((L, *shape[1: 1 + n_in], r), ("layers", *axes[1: 1 + n_in], None), normal)
            t[f"{n}_lora_b"] = ((L, r, *shape[1 + n_in:]), ("layers", None, *axes[1 + n_in:]), zeros)
    if c.has_mlp_bias:
        t["up_bias"] = ((L, M), ("layers", "mlp"), zeros)
        t["down_bias"] = ((L, E), ("layers", "norm"), zeros)
        if c.family == "llama":
            t["gate_bias"] = ((L, M), ("layers", "mlp"), zeros)
    return t


def init_cache(c: DecoderConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache of ``max_len`` slots: keys and values ``(L, B, max_len, kv_heads, D)``,
    which slots hold a valid token, each row's count of valid tokens and the next slot to write."""
    dtype = jnp.dtype(dtype or c.dtype)
    shape = (c.num_layers, batch, max_len, c.kv_heads, c.dim_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "valid": jnp.zeros((batch, max_len), bool),
            "length": jnp.zeros((batch,), jnp.int32), "index": jnp.zeros([], jnp.int32)}


class Decoder(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, rules: Rules = DEFAULT_RULES):
        c = self.config = config
        self.rules = rules
        pdt = jnp.dtype(c.param_dtype)
        E = c.hidden_size
        self.names = tuple(sorted(_param_table(c)))
        self.embed_tokens = param(rngs.params(), normal, (c.vocab_size, E), ("vocab", "embed"), pdt)
        if c.family == "gpt2":
            self.pos_embed = param(rngs.params(), normal, (c.max_position, E), (None, "norm"), pdt)
        for name, (shape, axes, init) in _param_table(c).items():
            setattr(self, name, param(rngs.params(), init, shape, axes, pdt))
        self.final_scale = param(rngs.params(), ones, (E,), ("norm",), pdt)
        if c.family == "gpt2":
            self.final_bias = param(rngs.params(), zeros, (E,), ("norm",), pdt)
        if not c.tie_embeddings:
            self.lm_head = param(rngs.params(), normal, (E, c.vocab_size), ("embed", "vocab"), pdt)

    # -- embeddings and logits ------------------------------------------------------------------

    def _table(self):
        # FSDP: gather the embed-sharded table before the lookup and the tied projection (as BERT).
        return constrain(self.embed_tokens[...], ("vocab", None), self.rules)

    def embed(self, ids):
        """Token embeddings ``(B, T, E)`` in the compute dtype (positions are added in ``__call__``)."""
        return jnp.take(self._table(), ids, axis=0).astype(jnp.dtype(self.config.dtype))

    def logits(self, hidden):
        """Next-token logits ``(..., vocab)`` from final hidden states, in float32."""
        w = self._table().T if self.config.tie_embeddings else self.lm_head[...]
        return (hidden @ w.astype(hidden.dtype)).astype(jnp.float32)

    def _norm(self, h, scale, bias):
        c = self.config
        return layer_norm(h, scale, bias, c.norm_eps) if c.family == "gpt2" else rms_norm(h, scale, c.norm_eps)

    # -- the stack ------------------------------------------------------------------------------

    def __call__(self, x, *, valid=None, cache: dict | None = None, return_hidden: bool = False):
        """``x (B, T, E)`` embeddings -> ``(logits (B, T, vocab), cache)`` (hidden states instead of
        logits with ``return_hidden``). ``valid (B, T)``: the real slots (default all). With a
        ``cache`` the ``T`` slots are written at ``cache["index"]`` and the returned cache holds
        them; without one the returned cache is None."""
        c, rules = self.config, self.rules
        b, t, _ = x.shape
        dtype = jnp.dtype(c.dtype)
        valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
        offset = None if cache is None else cache["length"]
        pos = positions_from_valid(valid, offset)
        x = x.astype(dtype)
        if c.family == "gpt2":
            x = x + jnp.take(self.pos_embed[...], jnp.minimum(pos, c.max_position - 1), axis=0).astype(dtype)
        x = constrain(x, _ACT, rules)
        if cache is None:
            index = jnp.zeros([], jnp.int32)
            kv_valid = valid
        else:
            index = cache["index"]
            kv_valid = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
        # A query in slot index + i sees the valid keys in slots <= index + i.
        q_slot = index + jnp.arange(t)
        k_slot = jnp.arange(kv_valid.shape[1])
        mask = (k_slot[None, :] <= q_slot[:, None])[None, None] & kv_valid[:, None, None, :]
        inv_freq = rope_frequencies(c) if c.family == "llama" else None
        params = {n: getattr(self, n)[...] for n in self.names}

        def body(h, inputs):
            p, ck, cv = inputs
            h, k, v = _layer(p, h, pos, mask, ck, cv, index, inv_freq, c, rules)
            return h, (k, v)

        if c.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan)
        ck = None if cache is None else cache["k"]
        cv = None if cache is None else cache["v"]
        if c.scan:
            x, (ks, vs) = jax.lax.scan(body, x, (params, ck, cv))
        else:
            per_layer = {n: jnp.unstack(v) for n, v in params.items()}  # one unstack (see layers.py)
            ks, vs = [], []
            for i in range(c.num_layers):
                x, (k, v) = body(x, ({n: v[i] for n, v in per_layer.items()},
                                     None if ck is None else ck[i], None if cv is None else cv[i]))
                ks.append(k)
                vs.append(v)
            ks, vs = jnp.stack(ks), jnp.stack(vs)
        x = self._norm(x, self.final_scale[...], self.final_bias[...] if c.family == "gpt2" else None)
        new_cache = None
        if cache is not None:
            new_cache = {"k": ks, "v": vs, "valid": kv_valid, "length": cache["length"] + valid.sum(1).astype(jnp.int32),
                         "index": index + t}
        return (x if return_hidden else self.logits(x)), new_cache


def _layer(p, x, pos, mask, cache_k, cache_v, index, inv_freq, c: DecoderConfig, rules: Rules):
    """One block; returns ``(x, keys, values)``: the keys and values the attention read (the
    cache's slots with this call's written in, or this call's own without a cache)."""
    dtype = x.dtype
    w = {n: (v if n.startswith("ln") else v.astype(dtype)) for n, v in p.items()}
    for n in c.lora_targets if c.lora_rank else ():
        delta = jnp.tensordot(w.pop(f"{n}_lora_a"), w.pop(f"{n}_lora_b"), axes=1)
        w[f"{n}_kernel"] = w[f"{n}_kernel"] + (c.lora_alpha / c.lora_rank) * delta
    norm = ((lambda h, i: layer_norm(h, p[f"ln{i}_scale"], p[f"ln{i}_bias"], c.norm_eps)) if c.family == "gpt2"
            else (lambda h, i: rms_norm(h, p[f"ln{i}_scale"], c.norm_eps)))
    heads = ("act_batch", "act_len", "act_heads", None)

    h = norm(x, 1)
    q, k, v = (jnp.einsum("bte,end->btnd", h, w[f"{n}_kernel"]) for n in "qkv")
    if "q_bias" in w:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if inv_freq is not None:
        q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
    q, k, v = (constrain(a, heads, rules) for a in (q, k, v))
    if cache_k is not None:
        k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0)).astype(dtype)
        v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0)).astype(dtype)
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=c.attention_impl)
    a = jnp.einsum("btnd,nde->bte", o, w["o_kernel"])
    if "o_bias" in w:
        a = a + w["o_bias"]
    x = constrain(x + a, _ACT, rules)

    h = norm(x, 2)
    up = jnp.einsum("bte,em->btm", h, w["up_kernel"])
    if "up_bias" in w:
        up = up + w["up_bias"]
    if c.family == "gpt2":
        m = jax.nn.gelu(up, approximate=True)  # "gelu_new"
    else:
        gate = jnp.einsum("bte,em->btm", h, w["gate_kernel"])
        if "gate_bias" in w:
            gate = gate + w["gate_bias"]
        m = jax.nn.silu(gate) * up
    m = constrain(m, ("act_batch", "act_len", "act_mlp"), rules)
    m = jnp.einsum("btm,me->bte", m, w["down_kernel"])
    if "down_bias" in w:
        m = m + w["down_bias"]
    return constrain(x + m, _ACT, rules), k, v


def merge_lora(model: Decoder) -> Decoder:
    """The same function without adapters: each adapted kernel holds ``W + (alpha / rank) A B``
    (for export to Hugging Face layouts, or serving without the extra matmuls)."""
    c = model.config
    if not c.lora_rank:
        return model
    state = nnx.to_pure_dict(nnx.state(model))
    scale = c.lora_alpha / c.lora_rank
    for n in c.lora_targets:
        a, b = state.pop(f"{n}_lora_a"), state.pop(f"{n}_lora_b")
        state[f"{n}_kernel"] = state[f"{n}_kernel"] + scale * jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
    out = nnx.eval_shape(lambda: Decoder(dataclasses.replace(c, lora_rank=0), rngs=nnx.Rngs(0), rules=model.rules))
    graphdef, template = nnx.split(out)
    nnx.replace_by_pure_dict(template, state)
    return nnx.merge(graphdef, template)
