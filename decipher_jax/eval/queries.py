"""The corpus' findings as zero-shot queries: prompt ensembles of positive and negated
phrasings, read by the zero-shot evaluator (:func:`decipher_jax.eval.evaluators.finding_queries`)
and by text-guided localisation (:mod:`decipher_jax.eval.localisation`)."""

from __future__ import annotations


def _query(region, positive, negative, label, positives):
    return {"region": region, "positive": positive, "negative": negative, "label": label, "positives": positives}


# Each finding of the corpus as a zero-shot query: a prompt ensemble of positive and of negated
# phrasings (``ZeroShot.contrast``), scored on the held-out series of the finding's body region.
# Paraphrases in a radiologist's words, not the generator's templates where a short clinical
# phrase allows it.
FINDING_QUERIES = {
    "infarct": _query("brain", ("there is an acute infarct", "acute ischemic stroke"),
                      ("no acute infarct", "no evidence of stroke"),
                      "'there is an acute infarct' vs 'no acute infarct'", "an infarct"),
    "mass": _query("brain", ("there is an intracranial mass", "a brain tumour with surrounding edema"),
                   ("no intracranial mass", "no mass lesion in the brain"),
                   "'there is an intracranial mass' vs 'no intracranial mass'", "a mass"),
    "effusion": _query("knee", ("there is a knee joint effusion", "fluid distends the joint"),
                       ("no joint effusion", "no fluid in the knee joint"),
                       "'there is a knee joint effusion' vs 'no joint effusion'", "an effusion"),
    "acl_tear": _query("knee", ("the anterior cruciate ligament is torn", "ACL rupture"),
                       ("the anterior cruciate ligament is intact", "no ACL tear"),
                       "'the anterior cruciate ligament is torn' vs '... is intact'", "an ACL tear"),
    "fracture": _query("spine", ("acute vertebral compression fracture", "a collapsed lumbar vertebral body"),
                       ("no vertebral fracture", "normal vertebral body heights"),
                       "'acute vertebral compression fracture' vs 'no vertebral fracture'", "a fracture"),
    "cord_lesion": _query("spine", ("there is a spinal cord lesion", "T2 hyperintense signal in the cord"),
                          ("the spinal cord is normal", "no cord signal abnormality"),
                          "'there is a spinal cord lesion' vs 'the spinal cord is normal'", "a cord lesion"),
    "liver_lesion": _query("abdomen", ("there is a focal liver lesion", "a hepatic cyst"),
                           ("no focal liver lesion", "the liver is normal"),
                           "'there is a focal liver lesion' vs 'no focal liver lesion'", "a liver lesion"),
    "absent_kidney": _query("abdomen", ("the kidney has been removed", "status post nephrectomy"),
                            ("both kidneys are present", "two normal kidneys"),
                            "'the kidney has been removed' vs 'both kidneys are present'", "one kidney"),
}
