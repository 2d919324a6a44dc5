"""Text for the image-conditioned decoder: a compact vocabulary over the report tokenizer, and the
training examples of report generation and visual question answering.

One sequence format serves both tasks::

    [BOS] question [SEP] answer [EOS]       (report generation: an empty question, the report as answer)

The loss reads the answer and the end token only. Questions and their answers come from the
record's facts (:func:`decipher_jax.eval.textgen.record_facts`: the lesion mask, the affine, the
metadata), never from the report.

:class:`SubVocab` maps the word pieces the training reports, the questions and the answers use
onto compact ids (0 pad, 1 bos, 2 eos, 3 sep, 4 unk, then the pieces): a decoder trained from
scratch on the corpus then predicts over a few hundred ids, not the tokenizer's 30 522, which on a
CPU is most of the step. Text is decoded back through the tokenizer itself.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from decipher_jax.data import transforms as T
from decipher_jax.eval import textgen

PAD, BOS, EOS, SEP, UNK = 0, 1, 2, 3, 4
SPECIAL = ("[PAD]", "[BOS]", "[EOS]", "[SEP]", "[UNK]")
# Every answer a question can have: they enter the vocabulary even when the training split lacks one.
ANSWERS = ("yes", "no", "left", "right", "small", "medium", "large", "t1", "t2", "flair", "dwi", "brain", "knee",
           "spine", "abdomen")
CAPTION = "report"  # the task name of report generation (VQA tasks are textgen.QUESTIONS' keys)


def _tokenizer(path: str):
    from decipher_jax.models.bert import load_tokenizer

    return load_tokenizer(path)


class SubVocab:
    """Compact ids over a tokenizer's word pieces (see the module docstring)."""

    def __init__(self, tokenizer_path: str, pieces):
        self.tokenizer_path = tokenizer_path
        self.pieces = tuple(int(p) for p in pieces)  # tokenizer ids, in compact-id order after SPECIAL
        self._to = {p: i + len(SPECIAL) for i, p in enumerate(self.pieces)}
        self._tok = None

    @classmethod
    def build(cls, tokenizer_path: str, texts) -> SubVocab:
        tok = _tokenizer(tokenizer_path)
        used: set[int] = set()
        for t in list(texts) + list(textgen.QUESTIONS.values()) + list(ANSWERS):
            used.update(tok(t, add_special_tokens=False)["input_ids"])
        v = cls(tokenizer_path, sorted(used))
        v._tok = tok
        return v

    def __len__(self) -> int:
        return len(SPECIAL) + len(self.pieces)

    def __getstate__(self):  # picklable for grain workers: the tokenizer reloads lazily
        return {**self.__dict__, "_tok": None}

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = _tokenizer(self.tokenizer_path)
        return self._tok

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self._to.get(i, UNK) for i in ids]

    def decode(self, ids) -> str:
        """Text of compact ids, up to the first end token (special ids dropped)."""
        out = []
        for i in np.asarray(ids).tolist():
            if i == EOS:
                break
            if i >= len(SPECIAL) and i < len(self):
                out.append(self.pieces[i - len(SPECIAL)])
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()


def question_ids(vocab: SubVocab, question: str, length: int) -> list[int]:
    """A question's ids, its last ``length // 2`` at most: a retrieval-augmented question starts
    with retrieved reports, which are cut from the front (the question itself ends it)."""
    q = vocab.encode(question) if question else []
    return q[-(length // 2):] if len(q) > length // 2 else q


def with_context(question: str, context: str) -> str:
    """A retrieval-augmented question: the retrieved reports, then the question (or nothing more:
    report generation)."""
    return f"{context} {question}".strip() if context else question


def sequence(vocab: SubVocab, question: str, answer: str, length: int):
    """``(ids, labels, loss_mask)`` of one example, padded to ``length``: ``labels[i]`` is the token
    after ``ids[i]``; the mask covers the answer and its end token (a too-long answer is cut, and
    then has no end token)."""
    q, a = question_ids(vocab, question, length), vocab.encode(answer)
    full = [BOS] + q + [SEP] + a + [EOS]
    first = len(q) + 2  # index in ``full`` of the answer's first token
    if len(full) > length + 1:
        full = full[: length + 1]
    ids = np.full(length, PAD, np.int32)
    labels = np.full(length, PAD, np.int32)
    mask = np.zeros(length, np.float32)
    n = len(full) - 1
    ids[:n], labels[:n] = full[:-1], full[1:]
    mask[first - 1: n] = 1.0  # positions whose next token is in the answer (or the end)
    return ids, labels, mask


def prompt(vocab: SubVocab, question: str, length: int) -> list[int]:
    """The ids a generation starts from: ``[BOS] question [SEP]`` (a report: no question), the
    question cut as in training (``length``: the run's ``data.max_length``)."""
    return [BOS] + question_ids(vocab, question, length) + [SEP]


@dataclasses.dataclass
class DecodeWithFacts(grain.transforms.Map):
    """A prepared record -> the decoded image and metadata (:class:`~decipher_jax.data.transforms.Decode`)
    plus ``qa``, its questions and answers (:func:`decipher_jax.eval.textgen.questions_for`)."""

    def map(self, ex):
        out = T.Decode().map(ex)
        out["qa"] = textgen.questions_for(textgen.record_facts(ex))
        return out


@dataclasses.dataclass
class Examples(grain.transforms.RandomMap):
    """A decoded record with ``qa`` -> one training example: its report with probability
    ``report_fraction`` (when it has one), else one of its questions, uniformly. With ``context``
    (series id -> retrieved reports) the question starts with the series' retrieved reports.
    ``answer_weight``: a question's answer tokens weigh this much in the loss (its ``loss_mask``),
    a report's 1. A report has about 55 word pieces and an answer 1 or 2, so at weight 1 the
    answers are about 3 % of the loss."""

    vocab: SubVocab
    length: int
    report_fraction: float = 0.5
    context: dict | None = None
    answer_weight: float = 1.0

    def random_map(self, ex, rng):
        report = ex.get("report", "")
        qa = ex["qa"]
        question = not (report.strip() and (not qa or rng.random() < self.report_fraction))
        if question:
            kind = sorted(qa)[int(rng.integers(len(qa)))]
            q, a = textgen.QUESTIONS[kind], qa[kind]
        else:
            q, a = "", report
        if self.context is not None:
            q = with_context(q, self.context.get(ex["series_id"], ""))
        ids, labels, mask = sequence(self.vocab, q, a, self.length)
        if question:
            mask = mask * np.float32(self.answer_weight)
        return {**ex, "ids": ids, "labels": labels, "loss_mask": mask}
