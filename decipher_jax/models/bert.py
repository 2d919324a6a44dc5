"""BERT report encoder (post-LN) with an optional masked-language-modelling head, in Flax NNX.

Loads any standard Hugging Face BERT directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``; the PubMedBERT / BiomedBERT layout) without Flax support from
transformers: the weights are converted by :mod:`decipher_jax.interop.hf_bert` (models never
import interop; the converter imports the model).

    model = hf_bert.from_pretrained(path)         # Bert with MLM head (decipher_jax.interop)
    tok = bert.load_tokenizer(path)
    hidden = model(input_ids, attention_mask)     # (B, T, E) last hidden states
    logits = model.mlm_logits(hidden)             # (B, T, vocab), tied to word embeddings
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax.models.layers import LayerNorm, StackConfig, TransformerStack, normal, param, zeros
from decipher_jax.sharding import DEFAULT_RULES, Rules, constrain

_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    mlm_head: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan: bool = False
    attention_impl: str | None = None

    def __post_init__(self):
        if self.hidden_act not in _GELU:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_GELU)}")

    @classmethod
    def from_hf(cls, d: dict, **overrides) -> BertConfig:
        """From a Hugging Face ``config.json`` dict."""
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"not a BERT config (model_type={d.get('model_type')!r})")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {d['position_embedding_type']!r}")
        kw = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
            max_position=d.get("max_position_embeddings", 512), type_vocab_size=d.get("type_vocab_size", 2),
            ln_eps=d.get("layer_norm_eps", 1e-12), pad_token_id=d.get("pad_token_id", 0) or 0,
            hidden_act=d.get("hidden_act", "gelu"),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        return {
            "architectures": ["BertForMaskedLM" if self.mlm_head else "BertModel"], "model_type": "bert",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size, "max_position_embeddings": self.max_position,
            "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.ln_eps,
            "pad_token_id": self.pad_token_id, "hidden_act": self.hidden_act,
            "position_embedding_type": "absolute", "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
        }

    def stack(self) -> StackConfig:
        return StackConfig(
            num_layers=self.num_layers, dim=self.hidden_size, heads=self.num_heads,
            mlp_dim=self.intermediate_size, qkv_bias=True, pre_norm=False, ln_eps=self.ln_eps,
            dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, scan=self.scan,
            attention_impl=self.attention_impl, kernel_init="normal", gelu_approximate=_GELU[self.hidden_act],
        )


class Bert(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, rules: Rules = DEFAULT_RULES):
        c = self.config = config
        self.rules = rules
        pdt = jnp.dtype(c.param_dtype)
        E = c.hidden_size
        self.word_embeddings = param(rngs.params(), normal, (c.vocab_size, E), ("vocab", "embed"), pdt)
        # Small tables are replicated: sharding them buys nothing and their gathers would reshard.
        self.position_embeddings = param(rngs.params(), normal, (c.max_position, E), (None, "norm"), pdt)
        self.token_type_embeddings = param(rngs.params(), normal, (c.type_vocab_size, E), (None, "norm"), pdt)
        self.emb_norm = LayerNorm(E, c.ln_eps, param_dtype=pdt)
        self.layers = TransformerStack(c.stack(), rngs=rngs, rules=rules)
        if c.mlm_head:
            self.mlm_kernel = param(rngs.params(), normal, (E, E), ("embed", None), pdt)
            self.mlm_bias = param(rngs.params(), zeros, (E,), ("norm",), pdt)
            self.mlm_norm = LayerNorm(E, c.ln_eps, param_dtype=pdt)
            self.mlm_decoder_bias = param(rngs.params(), zeros, (c.vocab_size,), ("vocab",), pdt)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, collect=(), return_layers=False,
                 drop_path: float = 0.0, key=None):
        """Last hidden states ``(B, T, E)`` (and ``{i: block output}`` with ``return_layers``)."""
        c = self.config
        b, t = input_ids.shape
        if t > c.max_position:
            raise ValueError(f"sequence length {t} exceeds max_position {c.max_position}")
        dtype = jnp.dtype(c.dtype)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        h = (
            jnp.take(self._word_table(), input_ids, axis=0)
            + self.position_embeddings[...][:t][None]
            + jnp.take(self.token_type_embeddings[...], token_type_ids, axis=0)
        )
        h = self.emb_norm(h.astype(dtype))
        h = constrain(h, ("act_batch", "act_len", "act_embed"), self.rules)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        h, layers = self.layers(h, mask=mask, collect=collect, drop_path=drop_path, key=key)
        return (h, layers) if return_layers else h

    def _word_table(self):
        # FSDP semantics: gather the (embed-sharded) table before the lookup / tied decoder.
        # Gathering rows of an embed-sharded table into a batch-sharded activation otherwise
        # forces XLA into a full rematerialisation (the SPMD partitioner warns of it).
        return constrain(self.word_embeddings[...], ("vocab", None), self.rules)

    def mlm_logits(self, hidden):
        """MLM head: dense + GELU + LayerNorm, then the tied word embeddings plus a bias."""
        if not self.config.mlm_head:
            raise ValueError("this Bert was built without an MLM head (mlm_head=False)")
        dtype = hidden.dtype
        h = hidden @ self.mlm_kernel[...].astype(dtype) + self.mlm_bias[...].astype(dtype)
        h = self.mlm_norm(jax.nn.gelu(h, approximate=self.config.stack().gelu_approximate))
        return h @ self._word_table().astype(dtype).T + self.mlm_decoder_bias[...].astype(dtype)


def read_config(path: str, **overrides) -> BertConfig:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face BERT directory)")
    with open(cfg_file) as f:
        return BertConfig.from_hf(json.load(f), **overrides)


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, through transformers, strictly offline."""
    from decipher_jax import env

    env.prepare(os.environ)  # HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE unless set
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
