"""Metrics of generated text, and the structured facts they are checked against.

- **BLEU-4** from sacrebleu (``BLEU()``: 4-grams, 13a tokenisation, exponential smoothing; the
  signature is returned with the score), never BLEU-1 under the name "BLEU".
- **ROUGE-L** F-measure from Google's rouge-score (its tokeniser: lower-cased, non-alphanumeric
  characters as separators; Porter stemming), averaged over the reports.
- **Clinical correctness**: each generated report is parsed into findings stated present or
  absent (:func:`mentions`: negations read, so "no acute infarct" is a negative statement, not a
  mention), and scored against the series' labelled findings: per-finding precision, recall and
  F1, and their macro and micro means.
- **VQA**: templated questions whose answers come from the record itself (sequence, body region,
  lesion present, its side and size from the lesion mask and the affine, a missing organ), never
  from the report text a model may have seen; exact-match accuracy per question type.
"""

from __future__ import annotations

import re

import numpy as np

from decipher_jax.data.pipelines import report_sentences

# -- BLEU-4 and ROUGE-L ---------------------------------------------------------------------------


def bleu4(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU-4 (sacrebleu, one reference per hypothesis): ``{"bleu4", "signature"}``."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    metric = BLEU()  # max_ngram_order 4, tokenize 13a, smooth exp
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu4": float(score.score), "signature": str(metric.get_signature())}


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, stemmed) over the pairs."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    f = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return float(np.mean(f)) if f else float("nan")


# -- findings stated in a report --------------------------------------------------------------------

# finding -> words that name it; a sentence naming it states it present unless negated.
FINDING_TERMS = {
    "infarct": r"infarct\w*|isch(a)?emi\w*|stroke|restricted diffusion",
    "mass": r"mass(es)?|neoplas\w*|tumou?r\w*|space[- ]occupying|intra-axial lesion|glioma",
    "effusion": r"effusions?",
    "acl_tear": r"anterior cruciate( ligament)?|acl|cruciate ligaments?|ligament tear",
    "fracture": r"fractur\w*|compression deformit\w*|vertebral body heights?|height loss",
    "cord_lesion": r"cord lesions?|intramedullary|myelitis|(spinal )?cord",
    "liver_lesion": r"liver lesions?|hepatic (cyst|lesion)s?|cystic lesion|liver|hepatic",
    "absent_kidney": r"kidneys?|nephrectomy|renal",
}
# Words stating a finding's structure normal: a negative statement ("the ACL is intact",
# "vertebral body heights are maintained", "both kidneys are present").
_NORMAL = r"intact|maintained|preserved|normal|unremarkable|present"
# Words of a lesion: a sentence with one that is not negated states its finding present, whatever
# else it calls normal ("normal liver with a 20 mm cyst"; but "liver normal, without focal lesion").
_LESION = (r"lesions?|cysts?|cystic|mass(es)?|neoplas\w*|tumou?r\w*|glioma|fractur\w*|deformit\w*|tears?|torn|"
           r"ruptur\w*|infarct\w*|isch(a)?emi\w*|stroke|restricted diffusion|effusions?|abnormalit\w*|myelitis|"
           r"hyperintens\w*|height loss|oedema|edema|space[- ]occupying|intramedullary")
# Words that, for a finding that is an absence, state it present ("the ACL is not visualized").
_ABSENCE = r"not (visuali[sz]ed|seen|identified)|absent|missing|nephrectomy|ruptur\w*|torn|tears?|solitary"
_ABSENCE_FINDINGS = ("acl_tear", "absent_kidney")
# Negation cues before the finding's words (NegEx's common pre-negations), within their clause.
_NEGATION = r"\b(no|not|without|negative for|free of|absence of|rules? out|ruled out)\b"
_CLAUSE_BREAK = r"\b(but|however|although|though|except)\b|;"


def _compile(p):
    return re.compile(rf"\b({p})\b", re.IGNORECASE)


_TERMS = {f: _compile(p) for f, p in FINDING_TERMS.items()}
_NORMAL_RE, _LESION_RE, _ABSENCE_RE = _compile(_NORMAL), _compile(_LESION), _compile(_ABSENCE)
_NEGATION_RE, _BREAK_RE = re.compile(_NEGATION, re.IGNORECASE), re.compile(_CLAUSE_BREAK, re.IGNORECASE)


def _negated(sentence: str, at: int) -> bool:
    """Whether a negation cue stands before position ``at`` in the same clause."""
    before = sentence[:at]
    breaks = list(_BREAK_RE.finditer(before))
    return _NEGATION_RE.search(before[breaks[-1].end():] if breaks else before) is not None


def sentence_findings(sentence: str) -> dict[str, bool]:
    """``{finding: present?}`` for each finding one sentence states (see :func:`mentions`)."""
    out = {}
    for f, term in _TERMS.items():
        m = term.search(sentence)
        if not m:
            continue
        if _negated(sentence, m.start()):
            out[f] = False
        elif f in _ABSENCE_FINDINGS:
            # "The ACL is not visualized", "status post nephrectomy": an absence stated is the finding;
            # "no ligament tear", "both kidneys are present" are not.
            out[f] = any(not _negated(sentence, a.start()) for a in _ABSENCE_RE.finditer(sentence)) and not re.search(
                r"\bboth\b", sentence, re.IGNORECASE)
        else:
            lesion = any(not _negated(sentence, a.start()) for a in _LESION_RE.finditer(sentence))
            out[f] = lesion or _NORMAL_RE.search(sentence) is None
    return out


def mentions(report: str) -> dict[str, bool]:
    """The findings a report states, ``{finding: True (present) / False (stated absent)}``;
    findings it does not speak of are missing. Sentence by sentence; a finding stated present in
    any sentence is present. The report's findings and impression sections both count."""
    out: dict[str, bool] = {}
    for s in report_sentences(report):
        for f, present in sentence_findings(s).items():
            out[f] = out.get(f, False) or present
    return out


def clinical_scores(generated: list[str], findings: list[set[str]], names=tuple(FINDING_TERMS)) -> dict:
    """Per-finding precision / recall / F1 of the findings the generated reports state present,
    against each series' labelled findings; macro means over the findings with a positive series
    or a positive prediction, and the micro F1 over all."""
    pred = np.array([[mentions(g).get(f, False) for f in names] for g in generated], bool).reshape(len(generated), len(names))
    gold = np.array([[f in fs for f in names] for fs in findings], bool).reshape(len(findings), len(names))
    per = {}
    for j, f in enumerate(names):
        tp, fp, fn = int((pred[:, j] & gold[:, j]).sum()), int((pred[:, j] & ~gold[:, j]).sum()), int((~pred[:, j] & gold[:, j]).sum())
        if tp + fp + fn == 0:
            continue
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        per[f] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "positives": int(gold[:, j].sum())}
    tp, fp, fn = int((pred & gold).sum()), int((pred & ~gold).sum()), int((~pred & gold).sum())
    micro = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    macro = float(np.mean([v["f1"] for v in per.values()])) if per else float("nan")
    return {"per_finding": per, "macro_f1": macro, "micro_f1": micro, "n": len(generated)}


# -- VQA from the record's facts ---------------------------------------------------------------------

QUESTIONS = {
    "sequence": "which sequence is this?",
    "region": "which body region is shown?",
    "lesion": "is there a lesion?",
    "side": "on which side is the lesion?",
    "size": "roughly how large is the lesion?",
    "organ_missing": "is an organ missing?",
}
# Questions whose answer needs the image: the language prior alone cannot beat the base rate.
IMAGE_DEPENDENT = ("lesion", "side", "organ_missing")
# Lesion volume bins (mL) for "how large": small below a 44 mm sphere, large above a 60 mm one. Of
# the demo corpus's 216 training series with a lesion (4 mm records): 61 % small, 28 % medium, 11 %
# large (a spinal cord lesion or a fracture is small, a mass or a liver cyst medium or large).
SIZE_BINS_ML = (45.0, 110.0)
_LATERAL = ("infarct", "mass")  # lesions whose side the report gives (brain)


def record_facts(ex: dict) -> dict:
    """The structured facts of one prepared record (the raw TFDS example or a decoded one with
    ``label``, ``affine``, ``spacing``): sequence, region, findings, whether a lesion is there,
    its side in RAS world coordinates (brain infarct or mass) and its volume in mL."""
    def text(k):
        v = ex.get(k, "")
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    findings = {f for f in text("findings").split(";") if f}
    facts = {"sequence": text("sequence"), "region": text("body_region"), "findings": findings,
             "lesion": bool(findings - {"absent_kidney"})}
    label = np.asarray(ex.get("label", np.zeros((2, 2, 2))))
    mask = label.squeeze() > 0 if label.size > 8 else np.zeros((1, 1, 1), bool)
    spacing = np.asarray(ex.get("spacing", np.ones(3)), np.float64)
    facts["lesion_ml"] = float(mask.sum() * np.prod(spacing) / 1000.0)
    if mask.any() and findings & set(_LATERAL):
        affine = np.asarray(ex["affine"], np.float64)
        centre = np.argwhere(mask).mean(0)
        x = affine[0, :3] @ centre + affine[0, 3]  # RAS: +x is the patient's right
        facts["side"] = "right" if x > 0 else "left"
    return facts


def questions_for(facts: dict) -> dict[str, str]:
    """``{question type: answer}`` for the questions one series can answer."""
    qa = {"sequence": facts["sequence"].lower(), "region": facts["region"],
          "lesion": "yes" if facts["lesion"] else "no"}
    if facts["lesion"] and facts["lesion_ml"] > 0:
        small, large = SIZE_BINS_ML
        qa["size"] = "small" if facts["lesion_ml"] < small else "medium" if facts["lesion_ml"] < large else "large"
    if "side" in facts:
        qa["side"] = facts["side"]
    if facts["region"] == "abdomen":
        qa["organ_missing"] = "yes" if "absent_kidney" in facts["findings"] else "no"
    return {k: v for k, v in qa.items() if v}


def normalise_answer(a: str) -> str:
    """Lower case, no punctuation, collapsed spaces: what exact match compares."""
    return " ".join(re.sub(r"[^\w\s]", " ", a.lower()).split())


def vqa_accuracy(kinds: list[str], predicted: list[str], answers: list[str]) -> dict:
    """Exact-match accuracy per question type (after :func:`normalise_answer`), with counts."""
    out = {}
    for k in sorted(set(kinds)):
        idx = [i for i, q in enumerate(kinds) if q == k]
        hit = [normalise_answer(predicted[i]) == normalise_answer(answers[i]) for i in idx]
        out[k] = {"accuracy": float(np.mean(hit)), "n": len(idx)}
    dep = [v for k, v in out.items() if k in IMAGE_DEPENDENT]
    if dep:
        out["image_dependent"] = {"accuracy": float(sum(v["accuracy"] * v["n"] for v in dep) / sum(v["n"] for v in dep)),
                                  "n": int(sum(v["n"] for v in dep))}
    return out
