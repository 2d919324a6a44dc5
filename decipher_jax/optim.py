"""Optax optimisers built from config: schedules, masks and regex rules over parameter paths.

Parameter trees are pure dicts; a leaf's *path* is its keys joined by ``/`` (for example
``backbone/blocks/qkv_kernel`` or ``head/last_layer_v``). Rules are ``(regex, value)`` pairs,
first match wins, matched with ``re.fullmatch`` against the path.

    tx = build(cfg.optim, params, depth=cfg.model.depth)
    # cfg.optim.lr_rules = [("backbone/.*", None)]      -> a frozen tower (LiT), no optimiser state
    # cfg.optim.lr_rules = [("backbone/patch_.*", 0.2)] -> DINOv2's patch-embedding lr x0.2
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from decipher_jax.sharding import path_str

# DINOv2 (param_groups.py): no decay on biases, norms, LayerScale; the issue adds embeddings;
# CLIP / SigLIP: none on the learnt temperature and bias.
DEFAULT_NO_DECAY = (r".*(bias|_bias|/scale|ln\d_scale|ls\d|pos_embed|cls|registers|mask_token|embeddings|last_layer_g|bn_scale|stem_norm"
                    r"|logit_scale).*")


def first_match(path: str, rules: Sequence[tuple[str, Any]], default):
    for pattern, value in rules:
        if re.fullmatch(pattern, path):
            return value
    return default


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end: float = 0.0) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup_steps, 1), max(total_steps, warmup_steps + 1), end)


def cosine_between(start: float, end: float, total_steps: int) -> optax.Schedule:
    """Cosine from ``start`` to ``end`` (either direction), flat afterwards."""

    def f(step):
        t = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * t))

    return f


def map_paths(fn, tree):
    """``fn(path, leaf)`` over a tree (masked ``optax.MaskedNode`` parts have no leaves)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def layer_decay(decay: float, depth: int, backbone: str = "backbone"):
    """DINOv2 layer-wise lr decay as ``fn(path, leaf) -> multiplier``: decay^(L+1-layer_id) with
    embeddings at layer 0, block i at i+1, final norm and heads at L+1. Stacked block
    parameters get a per-layer vector broadcast over the leading ``layers`` axis."""

    def mult(path, x):
        if not path.startswith(backbone + "/"):
            return 1.0
        rest = path[len(backbone) + 1:]
        if rest.startswith("blocks/"):
            ids = jnp.arange(1, depth + 1)
            return (decay ** (depth + 1 - ids)).reshape((depth,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
        if rest.startswith("norm/"):
            return 1.0
        return decay ** (depth + 1)

    return mult


def scale_by_path(fn) -> optax.GradientTransformation:
    """Multiplies each update by ``fn(path, update)`` (a scalar or broadcastable array)."""

    def update(updates, state, params=None):
        return map_paths(lambda p, u: u * jnp.asarray(fn(p, u), u.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clip_by_group_norm(max_norm: float, groups: Sequence[str]) -> optax.GradientTransformation:
    """Clips each top-level subtree (e.g. backbone, head) to ``max_norm`` separately (DINOv2)."""

    def update(updates, state, params=None):
        out = dict(updates)
        for g in groups:
            if g in out and jax.tree.leaves(out[g]):
                norm = optax.global_norm(out[g])
                scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
                out[g] = jax.tree.map(lambda u: u * scale, out[g])
        return out, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class ZeroUntilState(NamedTuple):
    count: jax.Array


def zero_until(steps: int, pred) -> optax.GradientTransformation:
    """Zeroes updates whose path satisfies ``pred`` for the first ``steps`` steps
    (DINOv2 keeps the prototype layer fixed during the first epoch)."""

    def update(updates, state, params=None):
        on = state.count >= steps
        updates = map_paths(lambda p, u: jnp.where(on, u, jnp.zeros_like(u)) if pred(p) else u, updates)
        return updates, ZeroUntilState(state.count + 1)

    return optax.GradientTransformation(lambda _: ZeroUntilState(jnp.zeros([], jnp.int32)), update)


def build(c, params, depth: int | None = None) -> optax.GradientTransformation:
    """The optimiser for ``params`` from an optim config (fields documented in the configs)."""
    lr = warmup_cosine(c.lr, c.warmup_steps, c.total_steps, c.get("min_lr", 0.0))
    wd = cosine_between(c.weight_decay, c.get("weight_decay_end", c.weight_decay), c.total_steps)
    no_decay = c.get("no_decay", DEFAULT_NO_DECAY)
    rules = [tuple(r) for r in c.get("lr_rules", ())]
    ld = layer_decay(c.layer_decay, depth) if c.get("layer_decay") and depth else None

    def multiplier(path, u):
        m = float(first_match(path, rules, 1.0))
        return m * ld(path, u) if ld else m

    chain = []
    if c.get("freeze_last_layer_steps", 0):
        chain.append(zero_until(c.freeze_last_layer_steps, lambda p: "last_layer" in p))
    if c.get("clip_norm"):
        groups = c.get("clip_groups", ())
        chain.append(clip_by_group_norm(c.clip_norm, groups) if groups else optax.clip_by_global_norm(c.clip_norm))
    chain.append(optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=lr, b1=c.get("b1", 0.9), b2=c.get("b2", 0.999), weight_decay=wd,
        mask=lambda p: map_paths(lambda path, _: re.fullmatch(no_decay, path) is None, p)))
    chain.append(scale_by_path(multiplier))
    if c.get("freeze_backbone_steps", 0):
        # Last in the chain, after weight decay: the backbone's parameters stay bitwise unchanged
        # while the head learns (a fine-tuning warm-up); its moments still follow the gradients.
        chain.append(zero_until(c.freeze_backbone_steps, lambda p: p.startswith("backbone/")))
    tx = optax.chain(*chain)
    frozen = map_paths(lambda p, _: first_match(p, rules, 1.0) is None, params)
    if any(jax.tree.leaves(frozen)):
        # Frozen leaves get no optimiser state at all (LiT: a locked tower costs no memory).
        labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def frozen_towers(c, params, towers) -> dict[str, bool]:
    """``{tower: True}`` where the optimiser's rules freeze every parameter under ``tower/``.

    A trainer then stops the gradient at that tower's output, so the locked tower costs no
    backward pass (LiT), not just no update."""
    rules = [tuple(r) for r in c.get("lr_rules", ())]
    out = {}
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for t in towers:
        mine = [p for p in paths if p.startswith(t + "/")]
        out[t] = bool(mine) and all(first_match(p, rules, 1.0) is None for p in mine)
    return out


def current_hparams(opt_state) -> dict:
    """lr and weight decay as injected at the current step (for logging)."""
    kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(s, kinds):
            return {"lr": s.hyperparams["learning_rate"], "weight_decay": s.hyperparams["weight_decay"]}
    return {}
