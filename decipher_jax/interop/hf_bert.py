"""Hugging Face BERT checkpoints <-> :class:`decipher_jax.models.bert.Bert`.

    model = hf_bert.from_pretrained(path)          # a HF BERT directory -> Bert (with MLM head)
    hf_bert.save_pretrained(model, out, tokenizer_dir=path)

Torch ``Linear.weight`` is ``(out, in)``: our kernels are its transpose. Query/key/value are
fused into one ``(E, 3, heads, head_dim)`` kernel per layer and layers are stacked. Both the
``bert.``-prefixed (``BertForMaskedLM``) and bare (``BertModel``) layouts load, as do the old
TF-converted ``gamma`` / ``beta`` LayerNorm names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
from flax import nnx

from decipher_jax.interop.common import fill_state, flat_arrays, read_torch_weights
from decipher_jax.models.bert import Bert, BertConfig, read_config

log = logging.getLogger(__name__)

# Present in HF checkpoints but not part of our encoder (or tied to the word embeddings).
_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.", "embeddings.position_ids", "cls.predictions.decoder.weight")
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _normalise_key(k: str) -> str:
    if k.startswith("bert."):
        k = k[len("bert."):]
    if k.endswith(".gamma"):
        k = k[: -len(".gamma")] + ".weight"
    if k.endswith(".beta"):
        k = k[: -len(".beta")] + ".bias"
    return k


def weights_file(path: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        f = os.path.join(path, name)
        if os.path.exists(f):
            return f
    raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")


def hf_to_ours(sd: dict[str, np.ndarray], c: BertConfig) -> dict[str, np.ndarray]:
    """Maps a HF state dict onto our parameter paths (layers stacked, qkv fused)."""
    sd = {_normalise_key(k): np.asarray(v) for k, v in sd.items()}
    E, H, L = c.hidden_size, c.num_heads, c.num_layers
    D = E // H
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def get(k):
        used.add(k)
        return sd[k]

    def T(k):  # torch Linear weight -> kernel
        return get(k).T

    out["word_embeddings"] = get("embeddings.word_embeddings.weight")
    out["position_embeddings"] = get("embeddings.position_embeddings.weight")
    out["token_type_embeddings"] = get("embeddings.token_type_embeddings.weight")
    out["emb_norm/scale"] = get("embeddings.LayerNorm.weight")
    out["emb_norm/bias"] = get("embeddings.LayerNorm.bias")
    per_layer: dict[str, list[np.ndarray]] = {}
    for i in range(L):
        p = f"encoder.layer.{i}."
        q, k, v = (T(p + f"attention.self.{n}.weight").reshape(E, H, D) for n in ("query", "key", "value"))
        qb, kb, vb = (get(p + f"attention.self.{n}.bias").reshape(H, D) for n in ("query", "key", "value"))
        entries = {
            "qkv_kernel": np.stack([q, k, v], axis=1),
            "qkv_bias": np.stack([qb, kb, vb], axis=0),
            "out_kernel": T(p + "attention.output.dense.weight").reshape(H, D, E),
            "out_bias": get(p + "attention.output.dense.bias"),
            "ln1_scale": get(p + "attention.output.LayerNorm.weight"),
            "ln1_bias": get(p + "attention.output.LayerNorm.bias"),
            "mlp_in_kernel": T(p + "intermediate.dense.weight"),
            "mlp_in_bias": get(p + "intermediate.dense.bias"),
            "mlp_out_kernel": T(p + "output.dense.weight"),
            "mlp_out_bias": get(p + "output.dense.bias"),
            "ln2_scale": get(p + "output.LayerNorm.weight"),
            "ln2_bias": get(p + "output.LayerNorm.bias"),
        }
        for name, arr in entries.items():
            per_layer.setdefault(name, []).append(arr)
    for name, arrs in per_layer.items():
        out[f"layers/{name}"] = np.stack(arrs)
    if c.mlm_head and "cls.predictions.transform.dense.weight" in sd:
        out["mlm_kernel"] = T("cls.predictions.transform.dense.weight")
        out["mlm_bias"] = get("cls.predictions.transform.dense.bias")
        out["mlm_norm/scale"] = get("cls.predictions.transform.LayerNorm.weight")
        out["mlm_norm/bias"] = get("cls.predictions.transform.LayerNorm.bias")
        bias_key = "cls.predictions.bias" if "cls.predictions.bias" in sd else "cls.predictions.decoder.bias"
        out["mlm_decoder_bias"] = get(bias_key)
        used.add("cls.predictions.decoder.bias")
    # An encoder without an MLM head reads a BertForMaskedLM checkpoint's encoder only (as
    # transformers' BertModel does); its prediction head is not an unexpected weight then.
    skip = _IGNORED_PREFIXES + (() if c.mlm_head else ("cls.predictions.",))
    leftover = sorted(k for k in set(sd) - used if not k.startswith(skip))
    if leftover:
        raise ValueError(f"unexpected BERT weights (not converted): {leftover[:10]}{' ...' if len(leftover) > 10 else ''}")
    return out


def ours_to_hf(arrays: dict[str, np.ndarray], c: BertConfig) -> dict[str, np.ndarray]:
    """Inverse of :func:`hf_to_ours`, in the ``BertForMaskedLM`` layout (``bert.`` prefix)."""
    E, H, L = c.hidden_size, c.num_heads, c.num_layers
    sd: dict[str, np.ndarray] = {
        "bert.embeddings.word_embeddings.weight": arrays["word_embeddings"],
        "bert.embeddings.position_embeddings.weight": arrays["position_embeddings"],
        "bert.embeddings.token_type_embeddings.weight": arrays["token_type_embeddings"],
        "bert.embeddings.LayerNorm.weight": arrays["emb_norm/scale"],
        "bert.embeddings.LayerNorm.bias": arrays["emb_norm/bias"],
    }
    lay = {k[len("layers/"):]: v for k, v in arrays.items() if k.startswith("layers/")}
    for i in range(L):
        p = f"bert.encoder.layer.{i}."
        qkv, qkv_b = lay["qkv_kernel"][i], lay["qkv_bias"][i]
        for j, n in enumerate(("query", "key", "value")):
            sd[p + f"attention.self.{n}.weight"] = qkv[:, j].reshape(E, E).T
            sd[p + f"attention.self.{n}.bias"] = qkv_b[j].reshape(E)
        sd[p + "attention.output.dense.weight"] = lay["out_kernel"][i].reshape(E, E).T
        sd[p + "attention.output.dense.bias"] = lay["out_bias"][i]
        sd[p + "attention.output.LayerNorm.weight"] = lay["ln1_scale"][i]
        sd[p + "attention.output.LayerNorm.bias"] = lay["ln1_bias"][i]
        sd[p + "intermediate.dense.weight"] = lay["mlp_in_kernel"][i].T
        sd[p + "intermediate.dense.bias"] = lay["mlp_in_bias"][i]
        sd[p + "output.dense.weight"] = lay["mlp_out_kernel"][i].T
        sd[p + "output.dense.bias"] = lay["mlp_out_bias"][i]
        sd[p + "output.LayerNorm.weight"] = lay["ln2_scale"][i]
        sd[p + "output.LayerNorm.bias"] = lay["ln2_bias"][i]
    if c.mlm_head:
        sd["cls.predictions.transform.dense.weight"] = arrays["mlm_kernel"].T
        sd["cls.predictions.transform.dense.bias"] = arrays["mlm_bias"]
        sd["cls.predictions.transform.LayerNorm.weight"] = arrays["mlm_norm/scale"]
        sd["cls.predictions.transform.LayerNorm.bias"] = arrays["mlm_norm/bias"]
        sd["cls.predictions.bias"] = arrays["mlm_decoder_bias"]
        sd["cls.predictions.decoder.weight"] = arrays["word_embeddings"]
        sd["cls.predictions.decoder.bias"] = arrays["mlm_decoder_bias"]
    del H
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def load_into(model: Bert, path: str) -> list[str]:
    """Overwrites ``model``'s parameters from a HF directory; returns names left at init.

    Only the MLM head may be absent (e.g. sentence-embedding checkpoints such as MiniLM).
    """
    wfile = weights_file(path)
    arrays = hf_to_ours(read_torch_weights(wfile), model.config)
    state, missing = fill_state(nnx.state(model), arrays, wfile, allow_missing=True)
    not_head = [m for m in missing if not m.startswith("mlm_")]
    if not_head:
        raise ValueError(f"{wfile}: no weights for {not_head}")
    if missing:
        log.warning("%s has no MLM head; %s keep their random initialisation", wfile, missing)
    nnx.update(model, state)
    return missing


def from_pretrained(path: str, *, mlm_head: bool = True, seed: int = 0, **overrides) -> Bert:
    """Builds a :class:`Bert` from a Hugging Face BERT directory (no network access)."""
    config = read_config(path, mlm_head=mlm_head, **overrides)
    model = Bert(config, rngs=nnx.Rngs(seed))
    load_into(model, path)
    return model


def save_pretrained(model: Bert, path: str, tokenizer_dir: str | None = None) -> str:
    """Writes ``config.json`` + ``model.safetensors`` readable by transformers' BERT classes."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    c = model.config
    sd = ours_to_hf(flat_arrays(nnx.state(model)), c)
    if not c.mlm_head:
        sd = {k[len("bert."):]: v for k, v in sd.items()}
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c.to_hf(), f, indent=2)
    if tokenizer_dir:
        for name in _TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(path, name))
    return path
