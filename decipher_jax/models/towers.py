"""Two towers for stage 2: the 3D ViT and the BERT report encoder, each with a projection into
one shared space (big_vision ``two_towers.py`` / open_clip layout).

Parameter tree (the optimiser's regex rules address the towers by these names)::

    image/...        the stage-1 ViT3D          text/...        the stage-1 BERT (no MLM head)
    image_proj       (vit.dim, d)               text_proj       (bert.hidden, d)
    logit_scale      log t (CLIP / SigLIP)      logit_bias      b (SigLIP)
                                                text_center     (bert.hidden,) (``center_text``)
                                                text_adapter/   w_in, b_in, w_out, b_out (``text_adapter``)

``center_text``: the pooled text features are centred on a fixed vector before the projection,
the mean feature of the training texts (set once when training starts, never trained). A
BERT's pooled sentence features are anisotropic, and after the stage-1 MLM run nearly
parallel (BENCHMARKS.md, "Stage 2 with series descriptions, centred text, held-out penalty
selection"), so after a bias-free projection and L2 normalisation every text sits near one
point until the projection learns to cancel the shared direction. Centring removes it up
front; it is part of the model, so zero-shot and retrieval apply it too.

``text_adapter``: a residual two-layer MLP on the (centred) pooled text features before the
projection, its output layer zero-initialised so that it starts as the identity (CLIP-Adapter,
Gao et al. 2021). A linear map of pooled sentence features scores "No acute infarct." as about
the sum of what it gives "no" and "infarct", so the difference between a finding's positive and
negated phrasing is nearly the same direction for every finding: a linear text head cannot
tell "the infarct is absent" from "something is absent". The adapter can. With a locked report
encoder its input is the cached features. Measured at 400 patients it made stage 2 worse
(zero-shot findings 0.60 -> 0.54, frozen finding probes 0.71 -> 0.69, a third slower per step:
it fits the mostly unique training sentences without the image tower learning what they
share; BENCHMARKS.md, "The ladder at 400 patients on generator version 5"), so it is off.

For the NeuroBERT-style objective (``objective="regress"``) the image projection maps into the
text encoder's own space (d = bert.hidden) and there is no text projection: the target is the
frozen pooled report embedding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax.models.bert import Bert, BertConfig
from decipher_jax.models.classifier import POOLS, check_pool, pool_features
from decipher_jax.models.layers import param
from decipher_jax.models.vit3d import ViT3D, ViTConfig

OBJECTIVES = ("clip", "siglip", "regress")


@dataclasses.dataclass(frozen=True)
class TowersConfig:
    objective: str = "clip"  # clip | siglip | regress
    embed_dim: int = 512  # shared space (ignored by "regress": the text space is used)
    # cls | mean | max (the patch tokens' mean / channel-wise max), or names joined by "+"
    # ("mean+max": side by side, the projection's input is twice the width).
    image_pool: str = "cls"
    text_pool: str = "cls"  # cls | mean (masked mean: sentence-transformers' pooling, e.g. MiniLM)
    # open_clip: t = 1/0.07; SigLIP: t' = log 10 and b = -10.
    logit_scale_init: float | None = None
    logit_bias_init: float | None = None
    center_text: bool = False  # a fixed ``text_center`` subtracted before the text projection
    # Stage 2's text of a series with a description: (1 - w) * pool(description + report)
    # + w * pool(description alone); see TwoTowers.pair_text_features.
    description_weight: float = 0.0
    text_adapter: int = 0  # hidden width of a residual MLP on the pooled text features (0: none)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        try:
            check_pool(self.image_pools)
        except ValueError as e:
            raise ValueError(f"image_pool {self.image_pool!r}: names of {POOLS} joined by '+'") from e
        if self.text_pool not in ("cls", "mean"):
            raise ValueError(f"text_pool must be 'cls' or 'mean', got {self.text_pool!r}")
        if self.text_adapter < 0 or (self.text_adapter and self.objective == "regress"):
            raise ValueError(f"text_adapter is a width >= 0 and needs a text projection (not 'regress'), got "
                             f"{self.text_adapter} with objective {self.objective!r}")

    @property
    def image_pools(self) -> tuple[str, ...]:
        return tuple(self.image_pool.split("+"))

    @property
    def scale_init(self) -> float:
        if self.logit_scale_init is not None:
            return self.logit_scale_init
        return math.log(10.0) if self.objective == "siglip" else math.log(1 / 0.07)

    @property
    def bias_init(self) -> float:
        if self.logit_bias_init is not None:
            return self.logit_bias_init
        return -10.0 if self.objective == "siglip" else 0.0


def normalise(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _xavier(key, shape, dtype):
    return jax.nn.initializers.xavier_uniform()(key, shape, dtype)


class TextAdapter(nnx.Module):
    """``x + gelu(x W_in + b_in) W_out + b_out``, ``W_out`` and ``b_out`` zero at init (the identity)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        zeros = jax.nn.initializers.zeros
        self.w_in = param(rngs.params(), _xavier, (dim, hidden), ("embed", "mlp"))
        self.b_in = param(rngs.params(), zeros, (hidden,), ("mlp",))
        self.w_out = param(rngs.params(), zeros, (hidden, dim), ("mlp", "embed"))
        self.b_out = param(rngs.params(), zeros, (dim,), ("embed",))

    def __call__(self, x):
        h = jax.nn.gelu(x @ self.w_in[...] + self.b_in[...], approximate=False)
        return x + h @ self.w_out[...] + self.b_out[...]


class TwoTowers(nnx.Module):
    def __init__(self, vit: ViTConfig, bert: BertConfig, cfg: TowersConfig, *, rngs: nnx.Rngs):
        if bert.mlm_head:
            bert = dataclasses.replace(bert, mlm_head=False)
        self.cfg = cfg
        self.image = ViT3D(vit, rngs=rngs)
        self.text = Bert(bert, rngs=rngs)
        out = bert.hidden_size if cfg.objective == "regress" else cfg.embed_dim
        self.image_proj = param(rngs.params(), _xavier, (len(cfg.image_pools) * vit.dim, out), ("embed", None))
        if cfg.objective != "regress":
            self.text_proj = param(rngs.params(), _xavier, (bert.hidden_size, out), ("embed", None))
            if cfg.center_text:
                self.text_center = param(rngs.params(), jax.nn.initializers.zeros, (bert.hidden_size,), ("embed",))
            if cfg.text_adapter:
                self.text_adapter = TextAdapter(bert.hidden_size, cfg.text_adapter, rngs=rngs)
        const = lambda v: lambda k, s, d: jnp.full(s, v, d)  # noqa: E731
        self.logit_scale = param(rngs.params(), const(cfg.scale_init), (), ())
        self.logit_bias = param(rngs.params(), const(cfg.bias_init), (), ())

    # -- towers ------------------------------------------------------------------------------
    def image_features(self, x, *, freeze: bool = False, drop_path: float = 0.0, key=None):
        """Pooled backbone features ``(B, k Dv)`` (``k`` pools side by side) and patch tokens
        ``(B, N, Dv)``."""
        out = self.image(x, drop_path=drop_path, key=key)
        pools = self.cfg.image_pools
        pooled = out["cls"] if pools == ("cls",) else pool_features(out, pools).astype(out["patch"].dtype)
        if freeze:  # a locked tower: no backward pass through it at all (LiT)
            pooled, patch = jax.lax.stop_gradient((pooled, out["patch"]))
            return pooled, patch
        return pooled, out["patch"]

    def text_features(self, input_ids, attention_mask, *, freeze: bool = False, tokens: bool = False):
        """Pooled report features ``(B, Dt)`` (and the token states ``(B, T, Dt)``)."""
        h = self.text(input_ids, attention_mask)
        if self.cfg.text_pool == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.astype(h.dtype)[..., None]
            pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        if freeze:
            pooled, h = jax.lax.stop_gradient((pooled, h))
        return (pooled, h) if tokens else pooled

    def pair_text_features(self, input_ids, attention_mask, desc_ids=None, desc_mask=None, has_desc=None, *,
                           freeze: bool = False):
        """Stage 2's pooled text features of a series ``(B, Dt)``: its text (the series
        description then the report), mixed with the description line alone at
        ``description_weight`` where the series has one (``has_desc``). A mean over the tokens of
        a long report leaves a short description a few percent of the pool, too little for the
        image tower to learn what tells a study's series apart."""
        ft = self.text_features(input_ids, attention_mask, freeze=freeze)
        w = self.cfg.description_weight
        if w and desc_ids is not None:
            fd = self.text_features(desc_ids, desc_mask, freeze=freeze)
            ft = jnp.where(has_desc[:, None] > 0, (1.0 - w) * ft + w * fd.astype(ft.dtype), ft)
        return ft

    # -- shared space --------------------------------------------------------------------------
    def project_image(self, feats):
        """Pooled features ``(..., k Dv)`` into the shared space; patch tokens ``(..., Dv)`` too
        when ``k > 1``: a single patch is its own mean and max, so it projects through the sum of
        the ``k`` blocks (the embedding of an image made of that one patch)."""
        w = self.image_proj[...]
        k = len(self.cfg.image_pools)
        if k > 1 and feats.shape[-1] * k == w.shape[0]:
            w = w.reshape(k, feats.shape[-1], -1).sum(0)
        return feats.astype(jnp.float32) @ w

    def project_text(self, feats):
        if self.cfg.objective == "regress":
            return feats.astype(jnp.float32)
        feats = feats.astype(jnp.float32)
        if self.cfg.center_text:
            feats = feats - self.text_center[...]
        if self.cfg.text_adapter:
            feats = self.text_adapter(feats)
        return feats @ self.text_proj[...]

    def encode_image(self, x, *, patches: bool = False, **kw):
        """L2-normalised image embeddings ``(B, d)`` (and per-patch embeddings ``(B, N, d)``)."""
        pooled, patch = self.image_features(x, **kw)
        z = normalise(self.project_image(pooled))
        return (z, normalise(self.project_image(patch))) if patches else z

    def patch_contributions(self, x):
        """``(B, N, d)``: each patch token's share of the image's projected (unnormalised)
        embedding, summing over the patches to ``project_image`` of the pooled features: ``1/N``
        of its projection for the mean, and for the max its own value on each channel where it
        is the arg-max (a max-pooled score is read from those patches only). A query's dot
        product with it is that patch's part of the query's score: the heatmap a pooled readout
        implies. ``None`` with a CLS readout, which no patch owns."""
        if "cls" in self.cfg.image_pools:
            return None
        return self.patch_shares(self.image(x)["patch"])

    def patch_shares(self, patch):
        """:meth:`patch_contributions` from the image tower's patch tokens ``(B, N, Dv)``
        already computed (a mean or max readout)."""
        pools = self.cfg.image_pools
        patch = patch.astype(jnp.float32)
        n, dim = patch.shape[1], patch.shape[2]
        w = self.image_proj[...].astype(jnp.float32)
        total = 0.0
        for i, p in enumerate(pools):
            wp = w[i * dim : (i + 1) * dim]
            if p == "mean":
                total = total + (patch / n) @ wp
            else:  # max: the arg-max patch of each channel owns it (as classifier.token_max)
                own = jax.nn.one_hot(jnp.argmax(patch, axis=1), n, axis=1, dtype=patch.dtype)
                total = total + (patch * own) @ wp
        return total

    def encode_text(self, input_ids, attention_mask, *, tokens: bool = False, **kw):
        """L2-normalised report embeddings ``(B, d)`` (and per-token embeddings ``(B, T, d)``,
        for token-level re-ranking)."""
        if not tokens:
            return normalise(self.project_text(self.text_features(input_ids, attention_mask, **kw)))
        pooled, h = self.text_features(input_ids, attention_mask, tokens=True, **kw)
        return normalise(self.project_text(pooled)), normalise(self.project_text(h))
