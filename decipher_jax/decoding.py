"""Decoding a :class:`decipher_jax.models.decoder.Decoder` under ``jax.jit``: greedy, temperature /
top-p sampling and beam search, batched, over a prompt given as embeddings (an image prefix and
the prompt's tokens), with or without the KV cache.

    out = decoding.generate(model, prompt, valid, max_new_tokens=64, eos_id=eos, method="beam", num_beams=4)
    out["tokens"]   # (B, max_new_tokens), pad after the first eos
    out["lengths"]  # tokens up to and including eos
    out["scores"]   # sum of log-probabilities (beam: the length-normalised score that chose it)

Prompts are left-padded (``valid`` marks the real slots; each row's last slot must be real), so
every row's next token comes from the same slot. Both ways of getting the next logits share the
selection code: ``use_cache=True`` writes each new token into the cache and runs the model on
that token alone; ``use_cache=False`` reruns the whole sequence so far (the reference the tests
hold the cache to, and the cost it saves).

Beam search keeps ``num_beams`` hypotheses per row; a hypothesis that has emitted ``eos`` stays
in the beam with its score frozen (it can only continue with ``pad`` at log-probability 0) and
competes with the live ones on the raw sum of log-probabilities, so the search has fixed shapes.
The hypothesis returned is the best by ``score / length ** length_penalty``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from decipher_jax.models.decoder import init_cache

METHODS = ("greedy", "sample", "beam")
_NEG = -1e9  # finite: -inf - -inf would be NaN in the beam scores


def top_p_filter(logits, top_p: float):
    """Logits outside the smallest set whose probability reaches ``top_p`` set to -inf (nucleus)."""
    if isinstance(top_p, (int, float)) and top_p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    before = jnp.cumsum(probs, -1) - probs  # mass strictly above each token
    keep_sorted = (before < top_p) | (top_p >= 1.0)  # the first token is always kept
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


class _Cached:
    """The next logits through the KV cache. State: the cache."""

    def __init__(self, model, prompt, valid, max_new: int):
        self.model, self.b, self.p = model, prompt.shape[0], prompt.shape[1]
        self.prompt, self.valid, self.max_new = prompt, valid, max_new

    def start(self):
        cache = init_cache(self.model.config, self.b, self.p + self.max_new, self.prompt.dtype)
        logits, cache = self.model(self.prompt, valid=self.valid, cache=cache)
        return cache, logits[:, -1]

    def advance(self, cache, tokens, t):
        del t
        logits, cache = self.model(self.model.embed(tokens[:, None]), valid=jnp.ones((tokens.shape[0], 1), bool),
                                   cache=cache)
        return cache, logits[:, 0]

    @staticmethod
    def take(cache, idx):
        return {k: (v[:, idx] if k in ("k", "v") else v[idx] if v.ndim else v) for k, v in cache.items()}


class _Uncached:
    """The next logits by rerunning the whole sequence. State: (embeddings, valid) buffers."""

    def __init__(self, model, prompt, valid, max_new: int):
        self.model, self.p = model, prompt.shape[1]
        self.x = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], max_new, prompt.shape[2]), prompt.dtype)], 1)
        self.v = jnp.concatenate([valid, jnp.zeros((prompt.shape[0], max_new), bool)], 1)

    def _logits_at(self, state, slot):
        logits, _ = self.model(state[0], valid=state[1])
        return jax.lax.dynamic_index_in_dim(logits, slot, 1, keepdims=False)

    def start(self):
        state = (self.x, self.v)
        return state, self._logits_at(state, self.p - 1)

    def advance(self, state, tokens, t):
        x, v = state
        slot = self.p + t
        x = jax.lax.dynamic_update_slice(x, self.model.embed(tokens[:, None]).astype(x.dtype), (0, slot, 0))
        v = jax.lax.dynamic_update_slice(v, jnp.ones((v.shape[0], 1), bool), (0, slot))
        return (x, v), self._logits_at((x, v), slot)

    @staticmethod
    def take(state, idx):
        return jax.tree.map(lambda a: a[idx], state)


def _stepper(model, prompt, valid, max_new, use_cache):
    return (_Cached if use_cache else _Uncached)(model, prompt, valid, max_new)


def _pick(logits, method, key, temperature, top_p):
    if method == "greedy":
        return jnp.argmax(logits, -1)
    logits = top_p_filter(logits / jnp.maximum(temperature, 1e-6), top_p)
    return jax.random.categorical(key, logits, -1)


def _sequential(model, prompt, valid, key, *, max_new, eos_id, pad_id, method, temperature, top_p, use_cache):
    s = _stepper(model, prompt, valid, max_new, use_cache)
    b = prompt.shape[0]
    state, logits = s.start()

    def body(t, carry):
        state, logits, tokens, done, score = carry
        tok = _pick(logits, method, jax.random.fold_in(key, t), temperature, top_p).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), tok[:, None], -1)[:, 0]
        tok = jnp.where(done, pad_id, tok)
        score = score + jnp.where(done, 0.0, logp)
        tokens = tokens.at[:, t].set(tok)
        done = done | (tok == eos_id)
        state, logits = s.advance(state, tok, t)
        return state, logits, tokens, done, score

    init = (state, logits, jnp.full((b, max_new), pad_id, jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32))
    _, _, tokens, _, score = jax.lax.fori_loop(0, max_new, body, init)
    return {"tokens": tokens, "lengths": _lengths(tokens, eos_id), "scores": score}


def _lengths(tokens, eos_id):
    n = tokens.shape[1]
    is_eos = tokens == eos_id
    first = jnp.where(is_eos.any(1), jnp.argmax(is_eos, 1) + 1, n)
    return first.astype(jnp.int32)


def _beam(model, prompt, valid, *, max_new, eos_id, pad_id, num_beams, length_penalty, use_cache):
    b, k = prompt.shape[0], num_beams
    s = _stepper(model, prompt, valid, max_new, use_cache)
    state, logits = s.start()
    rows = jnp.repeat(jnp.arange(b), k)  # every row's state tiled k times: (b * k, ...)
    state = s.take(state, rows)
    logits = logits[rows]
    vocab = logits.shape[-1]
    scores = jnp.tile(jnp.asarray([0.0] + [_NEG] * (k - 1), jnp.float32), (b, 1))  # the first step fans out of beam 0
    pad_only = jnp.full((vocab,), _NEG, jnp.float32).at[pad_id].set(0.0)

    def body(t, carry):
        state, logits, tokens, done, scores, lengths = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(b, k, vocab)
        logp = jnp.where(done[..., None], pad_only, logp)  # a finished hypothesis only pads, at no cost
        cand = (scores[..., None] + logp).reshape(b, k * vocab)
        scores, flat = jax.lax.top_k(cand, k)
        beam, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
        tokens = jnp.take_along_axis(tokens, beam[..., None], 1).at[:, :, t].set(tok)
        was_done = jnp.take_along_axis(done, beam, 1)
        lengths = jnp.take_along_axis(lengths, beam, 1) + (~was_done).astype(jnp.int32)
        done = was_done | (tok == eos_id)
        idx = (jnp.arange(b)[:, None] * k + beam).reshape(-1)
        state, logits = s.advance(s.take(state, idx), tok.reshape(-1), t)
        return state, logits, tokens, done, scores, lengths

    init = (state, logits, jnp.full((b, k, max_new), pad_id, jnp.int32), jnp.zeros((b, k), bool), scores,
            jnp.zeros((b, k), jnp.int32))
    _, _, tokens, _, scores, lengths = jax.lax.fori_loop(0, max_new, body, init)
    normed = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    best = jnp.argmax(normed, 1)
    pick = lambda a: jnp.take_along_axis(a, best.reshape((b,) + (1,) * (a.ndim - 1)), 1)[:, 0]  # noqa: E731
    return {"tokens": pick(tokens), "lengths": pick(lengths), "scores": pick(normed)}


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "eos_id", "pad_id", "method", "num_beams",
                                             "use_cache"))
def _generate(graphdef, state, prompt, valid, key, temperature, top_p, length_penalty, *, max_new, eos_id, pad_id,
              method, num_beams, use_cache):
    model = nnx.merge(graphdef, state)
    if method == "beam":
        return _beam(model, prompt, valid, max_new=max_new, eos_id=eos_id, pad_id=pad_id, num_beams=num_beams,
                     length_penalty=length_penalty, use_cache=use_cache)
    return _sequential(model, prompt, valid, key, max_new=max_new, eos_id=eos_id, pad_id=pad_id, method=method,
                       temperature=temperature, top_p=top_p, use_cache=use_cache)


def generate(model, prompt, valid=None, *, max_new_tokens: int, eos_id: int, pad_id: int = 0, method: str = "greedy",
             num_beams: int = 4, temperature: float = 1.0, top_p: float = 1.0, length_penalty: float = 1.0,
             key=None, use_cache: bool = True) -> dict:
    """Continues each row of ``prompt (B, P, E)`` (embeddings; ``valid (B, P)``, left-padded) by up
    to ``max_new_tokens``; see the module docstring. Compiled once per model structure, shapes and
    the static options; called under ``jax.set_mesh`` with sharded inputs, it runs sharded."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "sample" and key is None:
        raise ValueError("method='sample' needs a PRNG key")
    b, p = prompt.shape[:2]
    valid = jnp.ones((b, p), bool) if valid is None else jnp.asarray(valid).astype(bool)
    if not isinstance(valid, jax.core.Tracer) and not bool(jnp.all(valid[:, -1])):
        raise ValueError("every prompt row must end in a real slot: pad prompts on the left")
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    return _generate(graphdef, state, prompt, valid, key, jnp.float32(temperature), jnp.float32(top_p),
                     jnp.float32(length_penalty), max_new=int(max_new_tokens), eos_id=int(eos_id), pad_id=int(pad_id),
                     method=method, num_beams=int(num_beams), use_cache=bool(use_cache))
