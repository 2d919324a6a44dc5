"""Zero-shot scoring of query sentences against volumes with a stage-2 model.

    zs = ZeroShot.from_workdir("outputs/demo/stage2")
    sim = zs.score(volumes, ["there is an acute infarct", "no acute infarct"])     # (N, 2) cosines
    p = zs.contrast(volumes, positive=["acute infarct", "acute stroke"],
                    negative=["no acute infarct", "no evidence of stroke"])          # (N,) P(positive)

Each sentence is embedded under every prompt template (CLIP's prompt ensembling: the mean of
the normalised embeddings, renormalised); ``contrast`` and ``classify`` average several
phrasings of one class the same way and turn similarities into probabilities with the model's
learnt temperature (softmax over the classes; for SigLIP models, the sigmoid of each class's
logit, normalised over the classes).

Volumes are arrays already preprocessed like the training records (RAS, target spacing,
normalised: ``decipher prep`` output) of shape (X, Y, Z) or (X, Y, Z, 1); they are resized whole
to the model's input grid. ``decipher zeroshot`` runs this over a prepared split.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decipher_jax.data import transforms as T
from decipher_jax.eval.retrieval import normalise

TEMPLATES = ("{}", "{}.", "Findings: {}.", "Impression: {}.")
PAD_MULTIPLE = 16


class ZeroShot:
    def __init__(self, model, params, spec: dict, mesh, batch_size: int = 16):
        from decipher_jax.models.bert import load_tokenizer

        self.model, self.params, self.spec, self.mesh = model, params, spec, mesh
        self.tokenizer = load_tokenizer(spec["tokenizer"])
        self.max_length = int(spec["config"]["data"]["max_length"])
        self.image_size = tuple(spec["vit"]["img_size"])
        self.objective = spec["towers"]["objective"]
        self.batch_size = batch_size
        self._text = jax.jit(lambda p, ids, m: model(p).encode_text(ids, m))
        self._image = jax.jit(lambda p, b: {"image": model(p).encode_image(b["image"])})

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, mesh=None, **kw) -> ZeroShot:
        from decipher_jax import bundle, runs

        if bundle.is_bundle(workdir):  # an exported model bundle (decipher export)
            model, params, spec = bundle.from_pretrained(workdir, mesh)
        else:
            model, params, spec = runs.load_align(workdir, mesh=mesh, step=step)
        return cls(model, params, spec, model.mesh, **kw)

    # -- embeddings ------------------------------------------------------------------------------
    def encode_sentences(self, sentences: Sequence[str], templates: Sequence[str] = TEMPLATES) -> np.ndarray:
        """(S, d): each sentence averaged over the templates."""
        if isinstance(sentences, str):
            raise TypeError("sentences must be a list of strings, not one string")
        texts = [t.format(s) for s in sentences for t in templates]
        # Padded to the longest text rounded up to 16 (at most the run's max_length), not to
        # max_length: a query is about ten word pieces, and the tower's cost grows with the padded
        # length. The attention mask makes the embedding independent of the padding; the buckets
        # of 16 keep the compiled shapes few.
        longest = max((len(ids) for ids in self.tokenizer(texts, max_length=self.max_length, truncation=True)["input_ids"]),
                      default=1)
        length = min(self.max_length, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        enc = self.tokenizer(texts, max_length=length, truncation=True, padding="max_length", return_tensors="np")
        z = np.asarray(self._text(self.params, jnp.asarray(enc["input_ids"], jnp.int32),
                                  jnp.asarray(enc["attention_mask"], jnp.int32)))
        return normalise(normalise(z).reshape(len(sentences), len(templates), -1).mean(1))

    def encode_volumes(self, volumes) -> np.ndarray:
        """(N, d) image embeddings of preprocessed volumes (resized whole to the model's grid)."""
        from decipher_jax import sharding as sh
        from decipher_jax.eval import embed

        xs = [np.asarray(v, np.float32) for v in volumes]
        xs = [x[..., None] if x.ndim == 3 else x for x in xs]
        for i, x in enumerate(xs):
            if x.ndim != 4:
                raise ValueError(f"volume {i}: expected (X, Y, Z) or (X, Y, Z, C), got shape {x.shape}")
        x = np.stack([T._resize(v, self.image_size) for v in xs])
        pad = embed.round_batch(len(x), self.mesh) - len(x)
        if pad:
            x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
        with jax.set_mesh(self.mesh):
            z = self._image(self.params, sh.shard_batch({"image": x}, self.mesh))["image"]
        return np.asarray(jax.device_get(z))[: len(xs)]

    # -- scores -----------------------------------------------------------------------------------
    def score(self, volumes=None, sentences: Sequence[str] = (), templates: Sequence[str] = TEMPLATES, *,
              image_embeddings=None) -> np.ndarray:
        """(N, S) cosine similarities between volumes (or their ``image_embeddings``) and
        sentences (each template-ensembled)."""
        zi = self.encode_volumes(volumes) if image_embeddings is None else image_embeddings
        return self._cos(zi, self.encode_sentences(sentences, templates))

    def classify(self, volumes=None, classes: dict[str, Sequence[str]] | None = None, *,
                 image_embeddings=None, templates: Sequence[str] = TEMPLATES) -> tuple[np.ndarray, list[str]]:
        """(N, C) class probabilities; each class is an ensemble of phrasings."""
        if not classes:
            raise ValueError("classes must map a class name to a list of phrasings")
        zi = self.encode_volumes(volumes) if image_embeddings is None else image_embeddings
        zc = np.stack([self.encode_sentences(list(v), templates).mean(0) for v in classes.values()])
        logits = self.logits(self._cos(zi, normalise(zc)))
        if self.objective == "siglip":
            p = 1.0 / (1.0 + np.exp(-logits))
            return p / p.sum(1, keepdims=True), list(classes)
        logits = logits - logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True), list(classes)

    def contrast(self, volumes=None, positive: Sequence[str] = (), negative: Sequence[str] = (), **kw) -> np.ndarray:
        """(N,) P(positive) between an ensemble of positive and one of negative phrasings."""
        p, _ = self.classify(volumes, {"positive": positive, "negative": negative}, **kw)
        return p[:, 0]

    def logits(self, cos):
        scale = float(np.exp(min(float(self.params["logit_scale"]), np.log(100.0))))
        bias = float(self.params["logit_bias"]) if self.objective == "siglip" else 0.0
        if self.objective == "regress":  # no learnt temperature: CLIP's initial one
            scale = 1 / 0.07
        return scale * cos + bias

    @staticmethod
    def _cos(a, b):
        return normalise(np.asarray(a, np.float64)) @ normalise(np.asarray(b, np.float64)).T

    # -- a prepared split ---------------------------------------------------------------------------
    def embed_pairs(self, data_dir: str, split: str, *, tokens: bool = False) -> dict:
        """Image and report embeddings of every series with a report (and, with ``tokens``, the
        per-patch and per-word embeddings that token-level re-ranking reads)."""
        from decipher_jax.data import pipelines as P
        from decipher_jax.eval import embed

        return embed.embed_pairs(self.model, self.params, P.data_source(data_dir, split), self.mesh,
                                 image_size=self.image_size, tokenizer=self.spec["tokenizer"],
                                 max_length=self.max_length, batch_size=self.batch_size, tokens=tokens)

    def embed_split(self, data_dir: str, split: str) -> dict:
        """Image embeddings and metadata of every series of a prepared split."""
        from decipher_jax.data import pipelines as P
        from decipher_jax.eval import embed

        source = P.data_source(data_dir, split)
        tf = [T.Decode(), T.Resize(self.image_size)]
        fn = functools.partial(self._image, self.params)
        return embed.apply(fn, embed.scan_split(source, tf, embed.round_batch(self.batch_size, self.mesh)), self.mesh,
                           ["image"])
