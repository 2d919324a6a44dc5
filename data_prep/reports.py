"""Radiology report text: section extraction and normalisation.

Tokenisation happens at *load* time (``decipher_jax.data.pipelines``), not at prep: records
keep the normalised text, so one prepared dataset serves any tokenizer / max length.
"""

from __future__ import annotations

import re
import unicodedata

_SECTION = re.compile(r"^\s*(findings|impression|conclusion|technique|examination|history|indication|comparison)\s*:\s*",
                      re.IGNORECASE | re.MULTILINE)


def decode_utf8(raw: bytes, what: str) -> str:
    """Strict UTF-8 (a leading BOM dropped). Mis-encoded text is refused, never stored as U+FFFD:
    guessing a legacy code page would silently change words."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 at byte {e.start}; re-save the {what} as UTF-8") from None
    return text.removeprefix("\ufeff")


def normalise(text: str) -> str:
    """NFKC unicode, unified quotes/dashes, collapsed whitespace."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = re.sub(r"[\u2013\u2014]", "-", text)
    return re.sub(r"\s+", " ", text).strip()


def sections(text: str) -> dict[str, str]:
    """``{"findings": ..., "impression": ...}`` (lower-case keys) for the headed sections present."""
    out: dict[str, str] = {}
    matches = list(_SECTION.finditer(text))
    for m, nxt in zip(matches, matches[1:] + [None]):
        body = text[m.end(): nxt.start() if nxt else len(text)]
        out[m.group(1).lower()] = normalise(body)
    return out


CLINICAL_SECTIONS = ("history", "indication", "findings", "impression")


def clinical_text(text: str, keep: tuple[str, ...] = CLINICAL_SECTIONS) -> str:
    """The ``keep`` sections in that order (what the encoders learn from: the history's age, sex
    and reason, then findings and impression), or the whole text when the report has none of
    findings / impression. Examination and technique lines are dropped: they name the protocol,
    not what the images show."""
    s = sections(text)
    if not (s.get("findings") or s.get("impression")):
        return normalise(text)
    return " ".join(s[k] for k in keep if s.get(k))
