"""Frozen-encoder passes over a prepared split: every record once, in order, in sharded batches.

:func:`scan_split` yields host-local batches (the last one padded) so that every process runs
the same number of steps; :func:`apply` runs a jitted function of the global batch over them and
returns the valid rows as NumPy. String metadata (ids, findings, regions) is kept per row on a
single host; with several processes only the numeric outputs are gathered to every host.
"""

from __future__ import annotations

import functools
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np

from data_prep.schema import DECODED
from decipher_jax.data import pipelines as P
from decipher_jax.data import transforms as T

META = DECODED  # per-row metadata kept with the outputs: the record fields the decoder returns with the image


def scan_split(source, transforms, batch_size: int, *, process_index: int | None = None,
               process_count: int | None = None, read_threads: int = 8):
    """Yields ``(host_batch, n_valid)``: this host's shard once, in order, ``batch_size / P`` rows each."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if batch_size % pc:
        raise ValueError(f"batch {batch_size} does not divide over {pc} processes")
    per_host = batch_size // pc
    ds = grain.MapDataset.source(source)[pi::pc]
    for t in transforms:
        ds = ds.map(t)
    n_batches = math.ceil(math.ceil(len(source) / pc) / per_host)  # equal on every host
    it = iter(ds.to_iter_dataset(read_options=grain.ReadOptions(num_threads=read_threads))
              .batch(per_host, drop_remainder=False))
    template = None
    for _ in range(n_batches):
        batch = next(it, None)
        if batch is None:  # this host ran out first: an all-padding batch keeps the hosts in step
            yield {k: np.repeat(v[:1], per_host, 0) for k, v in template.items()}, 0
            continue
        template = template or batch
        n = len(next(iter(batch.values())))
        if n < per_host:
            batch = {k: np.concatenate([v, np.repeat(v[:1], per_host - n, 0)]) for k, v in batch.items()}
        yield batch, n


def _to_host(x):
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def apply(fn, batches, mesh, array_keys, meta_keys=META) -> dict[str, np.ndarray]:
    """``fn(global_batch) -> {name: (B, ...)}`` over ``batches``; the valid rows, concatenated."""
    outs: dict[str, list] = {}
    meta: dict[str, list] = {k: [] for k in meta_keys}
    with jax.set_mesh(mesh):
        for host, n in batches:
            g = P.to_global({k: host[k] for k in array_keys}, mesh)
            valid = P.to_global({"v": np.arange(len(host[array_keys[0]])) < n}, mesh)["v"]
            res = {k: _to_host(v) for k, v in fn(g).items()}
            keep = _to_host(valid)
            for k, v in res.items():
                outs.setdefault(k, []).append(v[keep])
            if jax.process_count() == 1:
                for k in meta_keys:
                    if k in host:
                        meta[k].append(np.asarray(host[k])[:n])
    out = {k: np.concatenate(v) for k, v in outs.items()}
    out |= {k: np.concatenate(v) for k, v in meta.items() if v}
    return out


@functools.lru_cache(maxsize=8)
def _pair_encoder(model, tokens: bool = False):
    def f(params, batch):
        m = model(params)
        if not tokens:
            return {"image": m.encode_image(batch["image"]),
                    "text": m.encode_text(batch["input_ids"], batch["attention_mask"])}
        img, patch = m.encode_image(batch["image"], patches=True)
        txt, tok = m.encode_text(batch["input_ids"], batch["attention_mask"], tokens=True)
        # Token-level embeddings for re-ranking: real word pieces only ([CLS]/[SEP]/padding out).
        ids = batch["input_ids"]
        keep = batch["attention_mask"].astype(bool) & (jnp.cumsum(batch["attention_mask"], 1) > 1)
        keep &= jnp.arange(ids.shape[1])[None] < batch["attention_mask"].sum(1, keepdims=True) - 1
        return {"image": img, "text": txt, "patch": patch, "tokens": tok, "token_mask": keep}

    return jax.jit(f)


def embed_pairs(model, params, source, mesh, *, image_size, tokenizer: str, max_length: int = 128,
                batch_size: int = 16, tokens: bool = False) -> dict:
    """Image and report embeddings (L2-normalised, shared space) of every series with a report;
    with ``tokens`` also per-patch and per-token embeddings (``patch``, ``tokens``, ``token_mask``).

    ``model`` is a :class:`decipher_jax.state.Model` of ``TwoTowers``; volumes are
    resized whole to the model's input grid (no crops).
    """
    batch_size = round_batch(batch_size, mesh)
    tf = [T.Decode(), T.Resize(tuple(image_size)), P.Tokenize(tokenizer, max_length), P.ToIds()]
    fn = functools.partial(_pair_encoder(model, tokens), params)
    out = apply(fn, scan_split(source, tf, batch_size), mesh, ["image", "input_ids", "attention_mask"])
    if "report" in out:
        keep = np.char.strip(out["report"].astype(str)) != ""
        out = {k: v[keep] for k, v in out.items()}
    return out


def round_batch(batch_size: int, mesh) -> int:
    """Rounds a batch up to a multiple of the devices on the mesh's batch axes."""
    n = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    return max(n, math.ceil(batch_size / n) * n)
