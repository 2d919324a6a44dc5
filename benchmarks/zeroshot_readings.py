"""Where zero-shot finding queries lose what a stage-2 tower carries (issue 18, item 5).

    .venv/bin/python benchmarks/zeroshot_readings.py --run W/stage2 --prep W/data/prep

Three readings of the shared space on the held-out series, each the mean AUROC over the
corpus's findings (each scored on the series of its body region):
- the evaluator's prompt ensembles (``eval/queries.FINDING_QUERIES``);
- the generator's own report phrasings as the ensembles (``synthetic._POS`` / ``_NEG``, the
  placeholders filled with one fixed value each): what the prompts' wording costs;
- a logistic probe (C = 1, per region) on the normalised image embeddings of the training
  split: what a linear readout of the image embedding finds.

Then the text side: the cosines between the findings' directions from their positive to their
negated phrasings (the generator's), in the centred pooled features of the locked report
encoder and after the model's own text projection (``TwoTowers.project_text``: the centre, the
adapter when the run has one, the projection). A sentence's pooled feature is close to the sum of its
words', so alike directions mean the text space says "something is absent" more than "this
finding is absent".
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from decipher_jax import env  # noqa: E402

env.setup(devices=1)

# One value per placeholder of the generator's finding sentences.
FILL = dict(side="left", lobe="frontal", size_mm="30", size="moderate", kind="complete", level="L2", loss="30",
            segment="right lobe")
# The findings that share a body region.
PAIRS = (("infarct", "mass"), ("effusion", "acl_tear"), ("fracture", "cord_lesion"), ("liver_lesion", "absent_kidney"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a stage-2 (clip_align) workdir")
    p.add_argument("--prep", required=True, help="its prepared data")
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from benchmarks.common import table
    from decipher_jax import zeroshot
    from decipher_jax.data import synthetic as S
    from decipher_jax.eval.evaluators import finding_queries
    from decipher_jax.eval.queries import FINDING_QUERIES

    zs = zeroshot.ZeroShot.from_workdir(args.run)
    te, tr = zs.embed_split(args.prep, "test"), zs.embed_split(args.prep, "train")
    own = {f: dict(q, positive=tuple(s.format(**FILL) for s in S._POS[f]), negative=tuple(S._NEG[f]))
           for f, q in FINDING_QUERIES.items()}
    readings = {"the evaluator's prompt ensembles": finding_queries(zs, te, FINDING_QUERIES)["queries"],
                "the generator's report phrasings": finding_queries(zs, te, own)["queries"]}
    probe = {}
    for f, q in FINDING_QUERIES.items():
        rtr, rte = tr["body_region"] == q["region"], te["body_region"] == q["region"]
        ytr = np.array([f in str(x).split(";") for x in tr["findings"]])[rtr]
        yte = np.array([f in str(x).split(";") for x in te["findings"]])[rte]
        if 0 < yte.sum() < len(yte) and 0 < ytr.sum() < len(ytr):
            clf = LogisticRegression(C=1.0, max_iter=2000).fit(tr["image"][rtr], ytr)
            probe[f] = {"auroc": roc_auc_score(yte, clf.decision_function(te["image"][rte]))}
    readings["a logistic probe on the image embedding"] = probe
    names = list(FINDING_QUERIES)
    rows = [[k, f"{np.mean([v['auroc'] for v in r.values()]):.3f}"]
            + [f"{r[f]['auroc']:.2f}" if f in r else "-" for f in names] for k, r in readings.items()]
    print(table(["reading", "mean AUROC"] + names, rows))

    m = zs.model(zs.params)

    def pooled(texts):
        enc = zs.tokenizer(list(texts), max_length=zs.max_length, truncation=True, padding="max_length",
                           return_tensors="np")
        return m.text_features(jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]))

    center = np.asarray(zs.params["text_center"]) if "text_center" in zs.params else 0.0
    spaces = {"pooled text (centred)": lambda f: np.asarray(f) - center,
              "after the text projection": lambda f: np.asarray(m.project_text(f))}  # centre, adapter, projection
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    rows = []
    for space, fn in spaces.items():
        dd = {f: fn(pooled([s.format(**FILL) for s in S._POS[f]])).mean(0) - fn(pooled(S._NEG[f])).mean(0)
              for f in names}
        c = np.array([[cos(dd[a], dd[b]) for b in names] for a in names])
        off = c[~np.eye(len(names), dtype=bool)]
        rows.append([space, f"{off.mean():.2f}", f"{off.min():.2f}", f"{off.max():.2f}"]
                    + [f"{cos(dd[a], dd[b]):.2f}" for a, b in PAIRS])
    print("cosine between the findings' (positive - negated) directions:")
    print(table(["space", "mean", "min", "max"] + [f"{a} / {b}" for a, b in PAIRS], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
