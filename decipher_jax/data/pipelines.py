"""Grain input pipelines for both pretraining stages and the evaluations.

    source (TFDS ArrayRecord) -> host shard -> shuffle(seed) -> repeat -> random transforms
      -> batch -> to_iter_dataset -> [mp_prefetch workers]

Every host reads only its own slice (``jax.process_index()::jax.process_count()``) and
yields its local part of the global batch; :func:`to_global` assembles ``jax.Array``s on the
mesh's batch sharding. The iterator's ``get_state()`` / ``set_state()`` is what the
checkpoint stores: after a restore, the next batch equals the uninterrupted run's.

Reports are tokenised here, at load time (records keep normalised text).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import zlib

import grain
import numpy as np

from decipher_jax.data import transforms as T


def data_source(tfds_dir: str, split: str):
    """Random-access source over a prepared split (``decipher prep`` output or its tfds dir)."""
    import tensorflow_datasets as tfds

    path = _dataset_dir(tfds_dir)
    return tfds.builder_from_directory(path).as_data_source(split)


def _dataset_dir(path: str) -> str:
    """Accepts the prep out_dir, its ``tfds`` dir, or the versioned dataset dir."""
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    for root, _, files in os.walk(path):
        if "dataset_info.json" in files and ".staging" not in root and ".old" not in root:
            return root
    raise FileNotFoundError(f"{path}: no prepared dataset (dataset_info.json) found; run `decipher prep` first")


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20) -> bool:
    """glibc: serve buffers below ``mmap_threshold`` from the heap and keep up to
    ``trim_threshold`` of freed memory, so volumes and crops reuse pages instead of faulting in
    fresh ``mmap`` pages on every record (a 2 M-voxel record read went 7 -> 3 ms on a 2-core VM,
    where page faults are dear). Applies to this process (``mallopt``) and, through the
    environment, to worker processes started after it. Returns whether glibc took it."""
    # Values a user already set in the environment win, here and in the workers.
    mmap_threshold = int(os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(mmap_threshold)))
    trim_threshold = int(os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(trim_threshold)))
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))  # M_MMAP_, M_TRIM_
    except (OSError, AttributeError):  # not glibc
        return False


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 8  # global batch; each host loads batch_size / process_count
    seed: int = 0
    shuffle: bool = True
    repeat: bool = True
    num_workers: int = 0  # 0: in-process; >0: grain multiprocessing workers
    # Reader threads per process. Grain's default (16) in *every* worker oversubscribes small
    # hosts: on 2 cores, 2 workers x 16 threads ran at half the in-process rate.
    read_threads: int | None = None  # None: 16 in-process, 1 per worker process
    drop_remainder: bool = True
    tune_malloc: bool = True  # see tune_malloc(): large buffers from the heap, not fresh mmap pages

    def read_options(self) -> grain.ReadOptions:
        threads = self.read_threads or (16 if self.num_workers == 0 else 1)
        return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * threads, 8))


def _base(source, cfg: LoaderConfig, process_index: int | None = None, process_count: int | None = None):
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if cfg.batch_size % pc:
        raise ValueError(f"global batch {cfg.batch_size} does not divide over {pc} processes")
    ds = grain.MapDataset.source(source)
    ds = ds[pi::pc]  # per-host shard
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if cfg.repeat:
        ds = ds.repeat()
    return ds.seed(cfg.seed), cfg.batch_size // pc


def _finish(ds, per_host: int, cfg: LoaderConfig):
    if cfg.tune_malloc:
        tune_malloc()
    # Batch after to_iter_dataset: a filter upstream makes the element count unknown.
    it = ds.to_iter_dataset(read_options=cfg.read_options()).batch(per_host, drop_remainder=cfg.drop_remainder)
    if cfg.num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it


@dataclasses.dataclass
class DropStrings(grain.transforms.Map):
    """Keeps only array-valued fields (strings cannot become jax arrays)."""

    def map(self, ex):
        return {k: v for k, v in ex.items() if isinstance(v, (np.ndarray, np.generic, float, int))}


def vision_ssl(source, cfg: LoaderConfig, crops: T.MultiCrop, **shard):
    """Stage 1 vision: ``{"global", "local", "masks"}`` batches of multi-crops."""
    ds, per_host = _base(source, cfg, **shard)
    ds = ds.map(T.Decode()).random_map(crops)
    return _finish(ds, per_host, cfg)


def images(source, cfg: LoaderConfig, size, *, train: bool = False, keep_label: bool = False, **shard):
    """Single volumes: random-resized crops when training, whole-volume resize otherwise."""
    ds, per_host = _base(source, cfg, **shard)
    ds = ds.map(T.Decode(keep_label=keep_label))
    ds = ds.random_map(T.SingleCrop(tuple(size))) if train else ds.map(T.Resize(tuple(size)))
    ds = ds.map(ToIds())
    return _finish(ds.map(DropStrings()), per_host, cfg)


def supervised(source, cfg: LoaderConfig, size, targets, *, train: bool, scale=(0.5, 1.0), flip_p: float = 0.5,
               **shard):
    """Single volumes with a task's targets (``targets``: a map adding ``y`` / ``y_mask`` to a
    decoded record): augmented random-resized crops when training (each axis flipped with
    probability ``flip_p``), the whole volume resized otherwise (as the probes' features)."""
    ds, per_host = _base(source, cfg, **shard)
    ds = ds.map(T.Decode()).map(targets)
    crop = T.SingleCrop(tuple(size), tuple(scale), augment=T.Augment(noise=0.0, flip_p=float(flip_p)))
    ds = ds.random_map(crop) if train else ds.map(T.Resize(tuple(size)))
    return _finish(ds.map(DropStrings()), per_host, cfg)


@dataclasses.dataclass
class ToIds(grain.transforms.Map):
    """Stable integer ids for study / patient / series / stage-2 text (CRC32), so they can travel
    as arrays."""

    def map(self, ex):
        out = dict(ex)
        for k in ("study_id", "patient_id", "series_id", "pair_id"):
            if k in ex:
                out[k + "_hash"] = np.int32(zlib.crc32(ex[k].encode()) & 0x7FFFFFFF)
        return out


PAIR_TEXTS = ("report", "description+report")
DESCRIPTION_LENGTH = 16  # tokens of the "SERIES: ..." line alone (desc_ids / desc_mask)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def report_sentences(report: str) -> list[str]:
    """A report's sentences, in order, each once: split after ``.``, ``!`` or ``?`` and at line
    breaks; whitespace collapsed; section headings alone ("FINDINGS:") and empty pieces
    dropped. Stage 2's sentence positives (``loss.sentence_weight``) are these."""
    out, seen = [], set()
    for piece in _SENTENCE_END.split(report or ""):
        t = " ".join(piece.split())
        if not t or (t.endswith(":") and t[:-1].isupper()):
            continue
        if t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return out


@dataclasses.dataclass
class PairText(grain.transforms.Map):
    """Stage 2's text for a series (``text``) and the id of that text (``pair_id``): pairs
    with equal ids are positives, and a locked text tower's cache is keyed by them.

    ``"report"``: the study's report, shared by every series of the study (id: the study).
    ``"description+report"``: the series description, then the report
    ("SERIES: AX T2 FLAIR.\nEXAMINATION: ..."), so each series of a study has its own text and
    the image tower is taught what tells them apart (id: study + description). The description
    line alone is kept too (``desc_text``, ``has_desc``): the towers can weigh it apart from
    the report (``TowersConfig.description_weight``). A series with no description falls back
    to the report alone.
    """

    mode: str = "report"

    def __post_init__(self):
        if self.mode not in PAIR_TEXTS:
            raise ValueError(f"data.text: unknown stage-2 text {self.mode!r}; expected one of {PAIR_TEXTS}")

    def map(self, ex):
        out = dict(ex)
        text, pid, line = ex["report"], ex["study_id"], ""
        desc = " ".join(ex.get("series_description", "").split())
        if self.mode == "description+report" and desc:
            line = f"SERIES: {desc}."
            text, pid = f"{line}\n{text}", f"{pid}\x1f{desc}"
        out["text"], out["pair_id"], out["desc_text"], out["has_desc"] = text, pid, line, np.float32(bool(line))
        return out


_TOKENIZER_LOCK = threading.Lock()


class Tokenize(grain.transforms.Map):
    """Report text -> ``input_ids`` / ``attention_mask`` with a Hugging Face tokenizer directory.

    The tokenizer loads lazily in each worker (it is not pickled).
    """

    def __init__(self, tokenizer_path: str, max_length: int = 128, field: str = "report",
                 names: tuple[str, str] = ("input_ids", "attention_mask")):
        self.tokenizer_path, self.max_length, self.field, self.names = tokenizer_path, max_length, field, names
        self._tok = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tok"} | {"_tok": None}

    def map(self, ex):
        if self._tok is None:
            # Reader threads call map concurrently; importing transformers from several threads
            # at once fails (lazy-module race), so the first load is serialised.
            with _TOKENIZER_LOCK:
                if self._tok is None:
                    from decipher_jax.models.bert import load_tokenizer

                    self._tok = load_tokenizer(self.tokenizer_path)
        enc = self._tok(ex[self.field], max_length=self.max_length, truncation=True, padding="max_length",
                        return_tensors="np")
        out = dict(ex)
        out[self.names[0]] = enc["input_ids"][0].astype(np.int32)
        out[self.names[1]] = enc["attention_mask"][0].astype(np.int32)
        return out


@dataclasses.dataclass
class MlmMask(grain.transforms.RandomMap):
    """BERT masking: 15% of non-special tokens (at most ``max_predictions``), 80/10/10.

    Adds ``mlm_ids`` (corrupted inputs), ``mlm_labels`` (original ids at predicted slots, -100
    elsewhere). Special ids are those of [CLS], [SEP], [PAD] (and [UNK] is maskable).
    """

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]
    probability: float = 0.15
    max_predictions: int = 20

    def random_map(self, ex, rng):
        ids = ex["input_ids"]
        candidates = np.flatnonzero(~np.isin(ids, self.special_ids) & (ex["attention_mask"] > 0))
        n = min(self.max_predictions, max(1, int(round(len(candidates) * self.probability)))) if len(candidates) else 0
        pos = rng.choice(candidates, size=n, replace=False) if n else np.zeros(0, int)
        labels = np.full_like(ids, -100)
        labels[pos] = ids[pos]
        corrupted = ids.copy()
        u = rng.random(n)
        corrupted[pos[u < 0.8]] = self.mask_id
        rand = pos[(u >= 0.8) & (u < 0.9)]
        corrupted[rand] = rng.integers(0, self.vocab_size, len(rand))
        out = dict(ex)
        out["mlm_ids"], out["mlm_labels"] = corrupted.astype(np.int32), labels.astype(np.int32)
        return out


def mlm_transform(tokenizer_path: str, **kw) -> MlmMask:
    from decipher_jax.models.bert import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    special = tuple(int(i) for i in {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id} if i is not None)
    return MlmMask(vocab_size=len(tok), mask_id=int(tok.mask_token_id), special_ids=special, **kw)


@dataclasses.dataclass
class HasReport(grain.transforms.Filter):
    def filter(self, ex):
        return bool(ex.get("report", "").strip())


def reports(source, cfg: LoaderConfig, tokenizer_path: str, max_length: int = 128, max_predictions: int = 20,
            **shard):
    """Stage 1 text: MLM batches of ``mlm_ids``, ``mlm_labels``, ``attention_mask``, ``input_ids``.

    Series of one study share a report: the text stream is per *study*, keeping the first
    series of each study (so a report is not seen once per sequence).
    """
    ds, per_host = _base(Subset(source, _first_series_per_study(source)), cfg, **shard)
    ds = ds.map(ReportOnly()).map(Tokenize(tokenizer_path, max_length))
    ds = ds.random_map(mlm_transform(tokenizer_path, max_predictions=max_predictions))
    return _finish(ds.map(DropStrings()), per_host, cfg)


class Subset:
    """A random-access view of ``source`` at ``indices`` (picklable, for worker processes)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices, int)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


@dataclasses.dataclass
class ReportOnly(grain.transforms.Map):
    def map(self, ex):
        v = ex["report"]
        return {"report": v.decode("utf-8") if isinstance(v, bytes) else str(v)}


def _first_series_per_study(source) -> np.ndarray:
    """Indices of the first series of every study that has a report (metadata-only pass)."""
    seen, keep = set(), []
    for i in range(len(source)):
        ex = source[i]
        study = ex["study_id"]
        if study in seen or not bool(ex["has_report"]):
            continue
        seen.add(study)
        keep.append(i)
    return np.asarray(keep, int)


def pairs(source, cfg: LoaderConfig, size, tokenizer_path: str, max_length: int = 128, *, train: bool = True,
          crop_scale: tuple[float, float] = (0.5, 1.0), text: str = "report", **shard):
    """Stage 2: (series crop, text tokens, ``pair_id_hash``, ``study_id_hash``) batches; the text
    is the study's report, or the series description and the report (``text``, see PairText),
    with then also the description line's tokens (``desc_ids``, ``desc_mask``, ``has_desc``)."""
    ds, per_host = _base(source, cfg, **shard)
    ds = ds.map(T.Decode()).filter(HasReport())
    ds = ds.random_map(T.SingleCrop(tuple(size), tuple(crop_scale))) if train else ds.map(T.Resize(tuple(size)))
    ds = ds.map(PairText(text)).map(Tokenize(tokenizer_path, max_length, field="text"))
    if text == "description+report":
        ds = ds.map(Tokenize(tokenizer_path, DESCRIPTION_LENGTH, field="desc_text", names=("desc_ids", "desc_mask")))
    ds = ds.map(ToIds())
    return _finish(ds.map(DropStrings()), per_host, cfg)


def to_global(batch: dict, mesh, rules=None):
    """Process-local numpy batch -> global ``jax.Array``s sharded over the batch mesh axes."""
    import jax

    from decipher_jax import sharding as sh

    rules = rules or sh.DEFAULT_RULES
    return {k: jax.make_array_from_process_local_data(sh.batch_sharding(mesh, np.ndim(v), rules), np.asarray(v))
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Multi-parametric studies (issue 22): a study's co-registered series as the channels of one volume


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def study_index(source, sequences) -> list[tuple[str, dict[str, int]]]:
    """``[(study_id, {sequence: record index})]`` of ``source``, studies in the order of their
    first record, each dict in ``sequences``' order (a metadata-only pass, as
    :func:`_first_series_per_study`). Series whose ``sequence`` is not one of ``sequences`` are
    left out (and a study with none of them); of two series of one study with the same sequence
    the first record is kept, so the index is a function of the records' order."""
    wanted = tuple(sequences)
    found: dict[str, dict[str, int]] = {}
    for i in range(len(source)):
        ex = source[i]
        seq = _text(ex["sequence"])
        if seq in wanted:
            found.setdefault(_text(ex["study_id"]), {}).setdefault(seq, i)
    return [(study, {s: m[s] for s in wanted if s in m}) for study, m in found.items()]


class StudySource:
    """A random-access source of studies over a source of series (picklable, for worker
    processes): item ``i`` is study ``index[i]`` (default: :func:`study_index`) with its series
    stacked as channels in ``sequences``' order:

    ``image`` (X, Y, Z, S) in the stored dtype (float16), an absent sequence's channel exactly 0;
    ``present`` (S,) bool; ``label`` (X, Y, Z) uint8, 1 where any present series' label map is
    non-zero (series without one add nothing); and the metadata of the first present series as
    :class:`T.Decode` gives it (study_id, patient_id, findings, age, sex, report, ...).

    The series must share one voxel grid (shape, and affine within 1e-3 mm), which
    ``decipher prep --studies resample`` guarantees; a study whose series do not is refused,
    never silently stacked voxel by voxel across different anatomy."""

    def __init__(self, source, sequences, index=None):
        self.source, self.sequences = source, tuple(sequences)
        self.index = study_index(source, self.sequences) if index is None else list(index)
        self._decode = T.Decode(keep_label=True)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        study, members = self.index[int(i)]
        if not members:
            raise ValueError(f"study {study}: none of the sequences {self.sequences} in its index entry")
        recs = {seq: self.source[int(j)] for seq, j in members.items()}
        first = next(s for s in self.sequences if s in recs)
        shape = np.shape(recs[first]["volume"])
        affine = np.asarray(recs[first]["affine"], np.float64)
        for seq, ex in recs.items():
            aff = np.asarray(ex["affine"], np.float64)
            if np.shape(ex["volume"]) != shape or not np.allclose(aff, affine, atol=1e-3):
                raise ValueError(
                    f"study {study}: series {_text(ex['series_id'])} ({seq}, voxel grid {np.shape(ex['volume'])}, "
                    f"origin {np.round(aff[:3, 3], 2).tolist()}) is not on the grid of series "
                    f"{_text(recs[first]['series_id'])} ({first}, {shape}, origin "
                    f"{np.round(affine[:3, 3], 2).tolist()}); a study's series are stacked as channels only on one "
                    "grid: prepare the data with `decipher prep --studies resample`")
        meta = None
        image = np.zeros((*shape, len(self.sequences)), np.asarray(recs[first]["volume"]).dtype)
        label = np.zeros(shape, np.uint8)
        present = np.zeros(len(self.sequences), bool)
        for c, seq in enumerate(self.sequences):
            if seq not in recs:
                continue
            d = self._decode.map(recs[seq])
            image[..., c] = d["image"][..., 0]
            present[c] = True
            if bool(recs[seq]["has_label"]):  # else a 2^3 placeholder (prep.process_row)
                label |= (d["label"] > 0).astype(np.uint8)
            if meta is None:
                meta = {k: v for k, v in d.items() if k not in ("image", "label")}
        return {**meta, "image": image, "present": present, "label": label}


def drop_sequences(present: np.ndarray, u: np.ndarray, drop: float, min_present: int) -> np.ndarray:
    """``present`` with each sequence dropped where ``u`` (uniform draws, one per sequence) is
    below ``drop``, then the dropped ones with the largest ``u`` given back until at least
    ``min_present`` remain (all of them, if fewer were present)."""
    keep = present & (u >= drop)
    short = min_present - int(keep.sum())
    if short > 0:
        back = np.flatnonzero(present & ~keep)
        keep[back[np.argsort(-u[back], kind="stable")[:short]]] = True
    return keep


@dataclasses.dataclass
class FindingTargets(grain.transforms.Map):
    """``y``: multi-hot float32 over ``findings`` from the record's ``;``-separated findings."""

    findings: tuple[str, ...]

    def map(self, ex):
        have = set(_text(ex.get("findings", "")).split(";"))
        return {**ex, "y": np.array([f in have for f in self.findings], np.float32)}


@dataclasses.dataclass
class WithoutLabel(grain.transforms.Map):
    def map(self, ex):
        return {k: v for k, v in ex.items() if k != "label"}


@dataclasses.dataclass
class StudyCrop(grain.transforms.RandomMap):
    """Training view of a study: sequence dropout, then one random-resized crop box and one set
    of flips shared by every channel and the label map (the series stay co-registered), then
    intensity augmentation per present channel (each sequence is its own scan with its own
    scale); absent and dropped channels are zeroed last, so no augmentation makes them non-zero.

    Draws from ``rng`` in a fixed order (S dropout draws, the crop box, 3 flips, then per present
    channel the intensity draws), so a record's view is a function of (seed, index) and an
    iterator-state restore continues exactly."""

    size: tuple[int, int, int] = (32, 32, 32)
    scale: tuple[float, float] = (0.5, 1.0)
    drop: float = 0.0
    min_present: int = 1
    augment: T.Augment = dataclasses.field(default_factory=lambda: T.Augment(noise=0.0))
    flip_axes: tuple[int, ...] = (0, 1, 2)  # (0,): left-right only (what keeps a template aligned)

    def random_map(self, ex, rng):
        present = drop_sequences(ex["present"], rng.random(len(ex["present"])), self.drop, self.min_present)
        crop = T.RandomResizedCrop3D(tuple(self.size), tuple(self.scale))
        out = dict(ex)
        if "label" in ex:
            img, out["label"] = crop(ex["image"], rng, ex["label"])
        else:
            img = crop(ex["image"], rng)
        flips = [ax for ax in range(3) if rng.random() < self.augment.flip_p and ax in self.flip_axes]
        if flips:
            img = np.flip(img, flips)
            if "label" in out:
                out["label"] = np.ascontiguousarray(np.flip(out["label"], flips))
        aug = dataclasses.replace(self.augment, flip_p=0.0)  # the flips are shared, drawn above
        image = np.zeros(img.shape, np.float32)
        for c in np.flatnonzero(present):
            image[..., c] = aug(img[..., c:c + 1], rng)[..., 0]
        out["image"], out["present"] = image, present
        return out


@dataclasses.dataclass
class StudyResize(grain.transforms.Map):
    """Evaluation view of a study: the whole volume resized (:class:`T.Resize`: trilinear image,
    nearest label map), absent channels zero."""

    size: tuple[int, int, int] = (32, 32, 32)

    def map(self, ex):
        out = T.Resize(tuple(self.size)).map(ex)
        image = np.asarray(out["image"], np.float32)
        image[..., ~ex["present"]] = 0.0  # a fresh float32 array (T.Resize copies), never the record's
        out["image"] = image
        return out


def studies(source, cfg: LoaderConfig, size, sequences=None, *, train: bool, findings=(), keep_label: bool = False,
            drop: float = 0.0, min_present: int = 1, complete_only: bool = False, scale=(0.5, 1.0),
            flip_axes=(0, 1, 2), **shard):
    """Multi-parametric studies (:class:`StudySource`) as batches of

    ``image`` (B, X, Y, Z, S) float32 (S = ``sequences``, default the synthetic corpus's T1, T2,
    FLAIR, DWI; an absent sequence's channel exactly 0), ``present`` (B, S) bool,
    ``study_id_hash`` / ``patient_id_hash`` int32 (:class:`ToIds`), ``age``; with ``findings``
    ``y`` (B, F) float32 multi-hot; with ``keep_label`` ``label`` (B, X, Y, Z) uint8, the union of
    the present series' lesion maps.

    Training: :class:`StudyCrop` (one crop box for all channels, scale range ``scale``; each
    present sequence dropped with probability ``drop``, at least ``min_present`` kept: the
    missing-sequence robustness of BrainMVP); evaluation: the whole volume resized, nothing
    dropped. ``flip_axes``: the axes training may flip ((0,): left-right only, which keeps an
    atlas-like template aligned with the anatomy). Studies with fewer than ``min_present`` of ``sequences`` are left out, and with
    ``complete_only`` every study lacking one of them."""
    from decipher_jax.data import synthetic

    sequences = tuple(synthetic.SEQUENCES if sequences is None else sequences)
    if not 1 <= min_present <= len(sequences):
        raise ValueError(f"studies: min_present={min_present} must be between 1 and the {len(sequences)} sequences "
                         f"{sequences}")
    if not 0.0 <= drop <= 1.0:
        raise ValueError(f"studies: drop={drop} is not a probability in [0, 1]")
    index = [(s, m) for s, m in study_index(source, sequences)
             if len(m) >= min_present and (not complete_only or len(m) == len(sequences))]
    ds, per_host = _base(StudySource(source, sequences, index), cfg, **shard)
    if findings:
        ds = ds.map(FindingTargets(tuple(findings)))
    if not keep_label:
        ds = ds.map(WithoutLabel())
    if train:
        ds = ds.random_map(StudyCrop(tuple(size), tuple(scale), float(drop), int(min_present),
                                     flip_axes=tuple(int(a) for a in flip_axes)))
    else:
        ds = ds.map(StudyResize(tuple(size)))
    ds = ds.map(ToIds())
    return _finish(ds.map(DropStrings()), per_host, cfg)
