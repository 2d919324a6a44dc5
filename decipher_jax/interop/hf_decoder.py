"""Hugging Face decoder checkpoints (GPT-2, Llama) <-> :class:`decipher_jax.models.decoder.Decoder`.

    model = hf_decoder.from_pretrained(path)       # config.json + model.safetensors (or .bin)
    hf_decoder.save_pretrained(model, out)         # readable by transformers' *ForCausalLM

GPT-2 stores its projections as ``Conv1D`` (weights ``(in, out)``, not transposed like
``Linear``) with query, key and value side by side in ``c_attn``; Llama stores ``Linear``
weights ``(out, in)`` with separate q/k/v projections and fewer key/value heads. Both become
our per-head kernels, stacked over layers. ``transformer.`` / ``model.`` prefixes are optional
(bare ``GPT2Model`` / ``LlamaModel`` checkpoints load too); a tied ``lm_head`` is the word
embedding table. Nothing is downloaded: ``path`` is a local directory.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from flax import nnx

from decipher_jax.interop.common import fill_state, flat_arrays, read_torch_weights
from decipher_jax.interop.hf_bert import weights_file
from decipher_jax.models.decoder import Decoder, DecoderConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "generation_config.json")
# Buffers some GPT-2 checkpoints carry (the causal mask), and rotary caches of old Llama ones.
_IGNORED = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")


def config_from_hf(d: dict, **overrides) -> DecoderConfig:
    """A :class:`DecoderConfig` from a Hugging Face ``config.json`` dict (gpt2 or llama)."""
    kind = d.get("model_type")
    if kind == "gpt2":
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation {act!r} is not supported (gelu_new only)")
        kw = dict(family="gpt2", vocab_size=d["vocab_size"], hidden_size=d["n_embd"], num_layers=d["n_layer"],
                  num_heads=d["n_head"], intermediate_size=d.get("n_inner"), max_position=d.get("n_positions", 1024),
                  norm_eps=d.get("layer_norm_epsilon", 1e-5), tie_embeddings=d.get("tie_word_embeddings", True))
    elif kind == "llama":
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama activation {d['hidden_act']!r} is not supported (silu only)")
        rope = dict(d.get("rope_parameters") or {})
        rope.update(d.get("rope_scaling") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "llama3"):
            raise ValueError(f"rope type {rtype!r} is not supported (default or llama3)")
        llama3 = None
        if rtype == "llama3":
            llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                      int(rope["original_max_position_embeddings"]))
        kw = dict(family="llama", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                  num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
                  num_kv_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
                  intermediate_size=d["intermediate_size"], max_position=d.get("max_position_embeddings", 2048),
                  norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_llama3=llama3,
                  attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
                  tie_embeddings=d.get("tie_word_embeddings", False))
    else:
        raise ValueError(f"unsupported decoder model_type {kind!r}; expected 'gpt2' or 'llama'")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = d.get(k)
        kw[k] = v[0] if isinstance(v, list) and v else v
    kw.update(overrides)
    return DecoderConfig(**kw)


def config_to_hf(c: DecoderConfig) -> dict:
    ids = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
    if c.family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads, "n_inner": c.intermediate_size,
                "n_positions": c.max_position, "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
                "tie_word_embeddings": c.tie_embeddings, **ids}
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_llama3:
        f, lo, hi, orig = c.rope_llama3
        rope.update(rope_type="llama3", factor=f, low_freq_factor=lo, high_freq_factor=hi,
                    original_max_position_embeddings=orig)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.kv_heads, "head_dim": c.dim_head, "intermediate_size": c.mlp_dim,
            "max_position_embeddings": c.max_position, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
            "rope_parameters": rope, "rope_scaling": rope if c.rope_llama3 else None, "hidden_act": "silu",
            "attention_bias": c.has_attention_bias, "mlp_bias": c.has_mlp_bias,
            "tie_word_embeddings": c.tie_embeddings, **ids}


def _strip(k: str, prefix: str) -> str:
    return k[len(prefix):] if k.startswith(prefix) else k


def hf_to_ours(sd: dict[str, np.ndarray], c: DecoderConfig) -> dict[str, np.ndarray]:
    """A HF state dict -> our parameter paths (per-head kernels, layers stacked)."""
    prefix = "transformer." if c.family == "gpt2" else "model."
    sd = {(k if k == "lm_head.weight" else _strip(k, prefix)): np.asarray(v) for k, v in sd.items()}
    E, H, K, D, L = c.hidden_size, c.heads, c.kv_heads, c.dim_head, c.num_layers
    used: set[str] = set()

    def get(k):
        if k not in sd:
            raise ValueError(f"missing {c.family} weight {k!r}")
        used.add(k)
        return sd[k]

    per: dict[str, list] = {}
    out: dict[str, np.ndarray] = {}
    if c.family == "gpt2":
        out["embed_tokens"], out["pos_embed"] = get("wte.weight"), get("wpe.weight")
        out["final_scale"], out["final_bias"] = get("ln_f.weight"), get("ln_f.bias")
        for i in range(L):
            p = f"h.{i}."
            qkv, qkv_b = get(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias")  # (E, 3E): in, out
            e = {"ln1_scale": get(p + "ln_1.weight"), "ln1_bias": get(p + "ln_1.bias"),
                 "ln2_scale": get(p + "ln_2.weight"), "ln2_bias": get(p + "ln_2.bias"),
                 "o_kernel": get(p + "attn.c_proj.weight").reshape(H, D, E), "o_bias": get(p + "attn.c_proj.bias"),
                 "up_kernel": get(p + "mlp.c_fc.weight"), "up_bias": get(p + "mlp.c_fc.bias"),
                 "down_kernel": get(p + "mlp.c_proj.weight"), "down_bias": get(p + "mlp.c_proj.bias")}
            for j, n in enumerate("qkv"):
                e[f"{n}_kernel"] = qkv[:, j * E:(j + 1) * E].reshape(E, H, D)
                e[f"{n}_bias"] = qkv_b[j * E:(j + 1) * E].reshape(H, D)
            for n, a in e.items():
                per.setdefault(n, []).append(a)
    else:
        out["embed_tokens"], out["final_scale"] = get("embed_tokens.weight"), get("norm.weight")
        for i in range(L):
            p = f"layers.{i}."
            a = p + "self_attn."
            e = {"ln1_scale": get(p + "input_layernorm.weight"), "ln2_scale": get(p + "post_attention_layernorm.weight"),
                 "q_kernel": get(a + "q_proj.weight").T.reshape(E, H, D),
                 "k_kernel": get(a + "k_proj.weight").T.reshape(E, K, D),
                 "v_kernel": get(a + "v_proj.weight").T.reshape(E, K, D),
                 "o_kernel": get(a + "o_proj.weight").T.reshape(H, D, E),
                 "gate_kernel": get(p + "mlp.gate_proj.weight").T, "up_kernel": get(p + "mlp.up_proj.weight").T,
                 "down_kernel": get(p + "mlp.down_proj.weight").T}
            if c.has_attention_bias:
                e.update(q_bias=get(a + "q_proj.bias").reshape(H, D), k_bias=get(a + "k_proj.bias").reshape(K, D),
                         v_bias=get(a + "v_proj.bias").reshape(K, D), o_bias=get(a + "o_proj.bias"))
            if c.has_mlp_bias:
                e.update(gate_bias=get(p + "mlp.gate_proj.bias"), up_bias=get(p + "mlp.up_proj.bias"),
                         down_bias=get(p + "mlp.down_proj.bias"))
            for n, arr in e.items():
                per.setdefault(n, []).append(arr)
    out.update({n: np.stack(arrs) for n, arrs in per.items()})
    if not c.tie_embeddings:
        out["lm_head"] = get("lm_head.weight").T
    else:
        used.add("lm_head.weight")  # a tied head may be stored as well; it is the embedding table
    leftover = sorted(k for k in set(sd) - used if not k.endswith(_IGNORED))
    if leftover:
        raise ValueError(f"unexpected {c.family} weights (not converted): {leftover[:10]}{' ...' if len(leftover) > 10 else ''}")
    return out


def ours_to_hf(arrays: dict[str, np.ndarray], c: DecoderConfig) -> dict[str, np.ndarray]:
    """Inverse of :func:`hf_to_ours`, in the ``*ForCausalLM`` layout."""
    E, H, K, D, L = c.hidden_size, c.heads, c.kv_heads, c.dim_head, c.num_layers
    lay = arrays
    sd: dict[str, np.ndarray] = {}
    if c.family == "gpt2":
        t = "transformer."
        sd[t + "wte.weight"], sd[t + "wpe.weight"] = lay["embed_tokens"], lay["pos_embed"]
        sd[t + "ln_f.weight"], sd[t + "ln_f.bias"] = lay["final_scale"], lay["final_bias"]
        for i in range(L):
            p = f"{t}h.{i}."
            sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = lay["ln1_scale"][i], lay["ln1_bias"][i]
            sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = lay["ln2_scale"][i], lay["ln2_bias"][i]
            sd[p + "attn.c_attn.weight"] = np.concatenate([lay[f"{n}_kernel"][i].reshape(E, E) for n in "qkv"], 1)
            sd[p + "attn.c_attn.bias"] = np.concatenate([lay[f"{n}_bias"][i].reshape(E) for n in "qkv"])
            sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = lay["o_kernel"][i].reshape(E, E), lay["o_bias"][i]
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = lay["up_kernel"][i], lay["up_bias"][i]
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = lay["down_kernel"][i], lay["down_bias"][i]
    else:
        t = "model."
        sd[t + "embed_tokens.weight"], sd[t + "norm.weight"] = lay["embed_tokens"], lay["final_scale"]
        for i in range(L):
            p = f"{t}layers.{i}."
            a = p + "self_attn."
            sd[p + "input_layernorm.weight"] = lay["ln1_scale"][i]
            sd[p + "post_attention_layernorm.weight"] = lay["ln2_scale"][i]
            sd[a + "q_proj.weight"] = lay["q_kernel"][i].reshape(E, H * D).T
            sd[a + "k_proj.weight"] = lay["k_kernel"][i].reshape(E, K * D).T
            sd[a + "v_proj.weight"] = lay["v_kernel"][i].reshape(E, K * D).T
            sd[a + "o_proj.weight"] = lay["o_kernel"][i].reshape(H * D, E).T
            for n in ("gate", "up", "down"):
                sd[p + f"mlp.{n}_proj.weight"] = lay[f"{n}_kernel"][i].T
            if c.has_attention_bias:
                for n in "qkv":
                    sd[a + f"{n}_proj.bias"] = lay[f"{n}_bias"][i].reshape(-1)
                sd[a + "o_proj.bias"] = lay["o_bias"][i]
            if c.has_mlp_bias:
                for n in ("gate", "up", "down"):
                    sd[p + f"mlp.{n}_proj.bias"] = lay[f"{n}_bias"][i]
    if not c.tie_embeddings:
        sd["lm_head.weight"] = lay["lm_head"].T
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def read_config(path: str, **overrides) -> DecoderConfig:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face GPT-2 or Llama directory)")
    with open(cfg_file) as f:
        return config_from_hf(json.load(f), **overrides)


def load_into(model: Decoder, path: str) -> None:
    """Overwrites ``model``'s parameters from a HF directory; every parameter must be there, but
    for LoRA adapters (they keep their initialisation: a zero update)."""
    wfile = weights_file(path)
    state, missing = fill_state(nnx.state(model), hf_to_ours(read_torch_weights(wfile), model.config), wfile,
                                allow_missing=True)
    absent = [m for m in missing if "_lora_" not in m]
    if absent:
        raise ValueError(f"{wfile}: no weights for {absent}")
    nnx.update(model, state)


def from_pretrained(path: str, *, seed: int = 0, **overrides) -> Decoder:
    """A :class:`Decoder` from a Hugging Face GPT-2 or Llama directory (no network access)."""
    model = Decoder(read_config(path, **overrides), rngs=nnx.Rngs(seed))
    load_into(model, path)
    return model


def save_pretrained(model: Decoder, path: str, tokenizer_dir: str | None = None) -> str:
    """Writes ``config.json`` + ``model.safetensors`` readable by transformers' causal LM classes."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    if model.config.lora_rank:
        raise ValueError("merge the LoRA adapters first (decoder.merge_lora): Hugging Face layouts have no place for them")
    sd = ours_to_hf(flat_arrays(nnx.state(model)), model.config)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(model.config), f, indent=2)
    for name in _TOKENIZER_FILES if tokenizer_dir else ():
        src = os.path.join(tokenizer_dir, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(path, name))
    return path
