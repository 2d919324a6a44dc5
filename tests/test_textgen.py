"""Generated-text metrics: BLEU-4 and ROUGE-L computed by hand, the negation parser on
handwritten sentences and on every sentence the generator writes, clinical scores and VQA
facts from the mask and the affine, never from the report."""

import math

import numpy as np
import pytest

from decipher_jax.data import synthetic as S
from decipher_jax.eval import textgen as G

HANDWRITTEN = [
    ("There is an acute infarct in the right occipital lobe.", "infarct", True),
    ("No evidence of acute infarction or hemorrhage.", "infarct", False),
    ("No mass lesion.", "mass", False),
    ("Large glioma in the left parietal lobe.", "mass", True),
    ("Moderate joint effusion is present.", "effusion", True),
    ("The knee joint is without effusion.", "effusion", False),
    ("Complete ACL rupture.", "acl_tear", True),
    ("Anterior cruciate ligament is intact.", "acl_tear", False),
    ("Both kidneys are present.", "absent_kidney", False),
    ("Status post left nephrectomy.", "absent_kidney", True),
    ("The right kidney is not seen.", "absent_kidney", True),
    ("Mild compression fracture of L3.", "fracture", True),
    ("No acute fracture or malalignment.", "fracture", False),
    ("Normal signal within the spinal cord.", "cord_lesion", False),
    ("Hepatic cyst measuring 25 mm.", "liver_lesion", True),
    ("Liver is normal in size without focal lesion.", "liver_lesion", False),
    ("Normal liver with a 20 mm cyst.", "liver_lesion", True),
    ("No acute infarct, but a mass is seen in the left frontal lobe.", "mass", True),
    ("No acute infarct, but a mass is seen in the left frontal lobe.", "infarct", False),
]


@pytest.mark.parametrize("sentence,finding,present", HANDWRITTEN)
def test_negation_parser_on_handwritten_sentences(sentence, finding, present):
    assert G.sentence_findings(sentence).get(finding) is present


def test_parser_reads_every_sentence_the_generator_writes():
    facts = {"side": "left", "lobe": "frontal", "size_mm": 20, "size": "small", "kind": "complete", "level": "L2",
             "loss": 25, "segment": "right lobe"}
    for f, templates in S._POS.items():
        for t in templates:
            m = G.sentence_findings(t.format(**facts))
            assert m.get(f) is True and not any(v for k, v in m.items() if k != f), t
    for f, templates in S._NEG.items():
        for t in templates:
            m = G.sentence_findings(t)
            assert m.get(f) is False and not any(m.values()), t
    ageing = [t for v in S._AGEING.values() for degree in v for t in degree]
    normal = sum(S._NORMAL.values(), []) + ageing + S._IMPRESSION_NORMAL
    assert not any(any(G.sentence_findings(t).values()) for t in normal)
    report = "FINDINGS:\nNo acute infarct. There is a 30 mm mass in the left frontal lobe.\n\nIMPRESSION:\nMass."
    assert G.mentions(report) == {"infarct": False, "mass": True}


def test_bleu4_and_rouge_l_by_hand():
    hyp, ref = "the cat sat on the mat", "the cat was on the mat"
    # 1- to 4-gram precisions 5/6, 3/5, 1/4, 0/3 (sacrebleu's exp smoothing: 1 / (2 * 3)); no brevity penalty.
    by_hand = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4)
    b = G.bleu4([hyp], [ref])
    assert b["bleu4"] == pytest.approx(by_hand, abs=1e-6) and "tok:13a" in b["signature"]
    assert G.bleu4([ref], [ref])["bleu4"] == pytest.approx(100.0)
    # LCS "the cat on the mat": 5 of 6 tokens each way; stemming makes "tears" match "tear".
    assert G.rouge_l([hyp, "acl tears"], [ref, "acl tear"]) == pytest.approx((5 / 6 + 1.0) / 2)


def test_clinical_scores_by_hand():
    generated = ["Acute infarct in the left frontal lobe. No mass.", "No acute infarct. No mass.",
                 "There is an acute infarct. A 20 mm mass.", "Large joint effusion."]
    gold = [{"infarct"}, {"infarct"}, {"mass"}, {"effusion", "acl_tear"}]
    s = G.clinical_scores(generated, gold)
    inf = s["per_finding"]["infarct"]  # tp 1 (row 0), fp 1 (row 2), fn 1 (row 1)
    assert (inf["precision"], inf["recall"], inf["f1"]) == (0.5, 0.5, 0.5)
    assert s["per_finding"]["mass"]["f1"] == 1.0 and s["per_finding"]["acl_tear"]["recall"] == 0.0
    # micro: tp 3 (infarct, mass, effusion), fp 1, fn 2 (infarct, acl_tear)
    assert s["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))


def _record(mask_x, flip=False):
    label = np.zeros((10, 8, 8), np.uint16)
    label[mask_x, 3:5, 3:5] = 1
    affine = np.diag([-2.0 if flip else 2.0, 2.0, 2.0, 1.0])
    affine[0, 3] = 9.0 if flip else -9.0  # the volume centred on x = 0
    return {"label": label, "affine": affine, "spacing": np.array([2.0, 2.0, 2.0]), "findings": "infarct",
            "sequence": "FLAIR", "body_region": "brain",
            "report": "Acute infarct in the left frontal lobe."}  # the report is never read


def test_vqa_facts_come_from_the_mask_and_the_affine():
    right = G.record_facts(_record(slice(7, 9)))
    assert right["side"] == "right" and right["lesion"] and right["lesion_ml"] == pytest.approx(8 * 8 / 1000)
    assert G.record_facts(_record(slice(7, 9), flip=True))["side"] == "left"  # the same voxels, x axis reversed
    qa = G.questions_for(right)
    assert qa == {"sequence": "flair", "region": "brain", "lesion": "yes", "size": "small", "side": "right"}
    kidney = G.questions_for({"sequence": "T2", "region": "abdomen", "findings": {"absent_kidney"}, "lesion": False,
                              "lesion_ml": 0.0})
    assert kidney["organ_missing"] == "yes" and kidney["lesion"] == "no" and "side" not in kidney


def test_vqa_accuracy_per_type():
    acc = G.vqa_accuracy(["lesion", "lesion", "side", "sequence"], ["Yes.", "no", "left", "t2"],
                         ["yes", "yes", "right", "T2"])
    assert acc["lesion"] == {"accuracy": 0.5, "n": 2} and acc["side"]["accuracy"] == 0.0
    assert acc["sequence"]["accuracy"] == 1.0 and acc["image_dependent"] == {"accuracy": 1 / 3, "n": 3}


def test_record_facts_agree_with_the_generator_on_prepared_records(prepared_heldout):
    from decipher_jax.data import pipelines as P

    src = P.data_source(prepared_heldout, "train")
    checked = 0
    for i in range(len(src)):
        ex = src[i]
        f = G.record_facts(ex)
        report = ex["report"].decode() if isinstance(ex["report"], bytes) else ex["report"]
        assert f["lesion"] == (f["lesion_ml"] > 0) or "absent_kidney" in f["findings"]
        if "side" in f and len(f["findings"] & {"infarct", "mass"}) == 1:
            said = {s for s in ("left", "right") if f" {s} " in report}
            if len(said) == 1:  # the report names the side (some phrasings do not)
                assert said == {f["side"]}, (ex["series_id"], report)
                checked += 1
    assert checked >= 3
