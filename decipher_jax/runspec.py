"""``run_spec.json``: what a training run is, in one schema for every trainer.

Every trainer writes it at start, before any checkpoint is read, and readers (stage 2's image
tower, zero-shot, evaluation, the report) rebuild models from it:

    kind           "vision_ssl" | "text_mlm" | "clip_align" (the trainer)
    config         the run's config as of its latest start (JSON form)
    vit, bert, towers   the model configs the run built (null where the run has none)
    tokenizer      the text tower's tokenizer directory ("" for an image-only run)
    preprocessing  the prepared data's preprocessing (from its dataset card), or null
    history        one entry per start: {"step", "time", "changed": {field: [old, new]}}

A resume compares the new config with the stored one first: fields that change what the
checkpoint holds or what the data are (model sizes, batch size, crops, loss settings) are
refused, naming them, since a restore would fail inside Orbax ("requested shape (32,) is not
compatible with the stored shape (64,)") or, worse, silently mix two runs; fields a user may
change mid-run (step counts, learning-rate schedule scalars, cadences, mesh, evaluation) are
allowed and recorded in ``history``, so the record of what trained steps 1..s stays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

from decipher_jax import layout

SCHEMA = "decipher_jax.run_spec/1"
FILE = layout.SPEC_FILE  # in a workdir: layout.RunDir(workdir).spec
MODELS = ("vit", "bert", "towers")

# Config fields (dotted, fullmatch) that may change on resume. Everything else is refused.
RESUMABLE = (
    r"steps", r"stop_after", r"log_every", r"checkpoint_every", r"keep_checkpoints",
    r"async_checkpoints", r"preemption_grace_s", r"guard_update_ratio", r"mesh\..*", r"eval\..*",
    r"data\.num_workers", r"init\..*", r"export_hf",
    r"model\.head_init",  # acts only when a fine-tuning state is built fresh
    r"optim\.(lr|min_lr|warmup_steps|total_steps|weight_decay|weight_decay_end|clip_norm|b1|b2|layer_decay)",
)


class ConfigMismatch(ValueError):
    """A resume whose config changes fields the checkpoint or the data depend on."""


@dataclasses.dataclass
class RunSpec:
    kind: str
    config: dict
    vit: dict | None = None
    bert: dict | None = None
    towers: dict | None = None
    tokenizer: str = ""
    preprocessing: dict | None = None
    history: list = dataclasses.field(default_factory=list)
    schema: str = SCHEMA

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"run spec has unknown fields {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def as_json(obj):
    """A config or dataclass in the form JSON reads back (tuples as lists, odd leaves as str)."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    elif dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def read(workdir: str) -> RunSpec | None:
    path = layout.RunDir(workdir).spec
    if not os.path.exists(path):
        return None
    with open(path) as f:
        d = json.load(f)
    if "schema" not in d:  # a spec without the shared schema records no kind
        d = {"kind": "", **{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(RunSpec)}}}
    return RunSpec.from_dict(d)


def write(workdir: str, spec: RunSpec):
    """Atomically (a reader never sees half a file); the caller writes from process 0 only."""
    os.makedirs(workdir, exist_ok=True)
    path = layout.RunDir(workdir).spec
    with open(path + ".tmp", "w") as f:
        json.dump(spec.to_dict(), f, indent=1)
    os.replace(path + ".tmp", path)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


# Config fields added after runs had been written, with the value that behaves as the code did
# before the field existed: a stored spec without the field resumes under that value (any other
# value is a change, refused or allowed as usual).
ADDED_FIELDS = {"data.answer_weight": 1.0, "model.captioner.anomaly_bank": 0, "data.flip_p": 0.5, "optim.pretrained": {},
                "model.head_init": "random"}


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """``{field: [old, new]}`` over the dotted fields of two JSON configs (missing = None, or the
    field's :data:`ADDED_FIELDS` value)."""
    a, b = flatten(old), flatten(new)
    for k, v in ADDED_FIELDS.items():
        for d in (a, b):
            if k not in d and k in (set(a) | set(b)):
                d[k] = v
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def start(workdir: str, spec: RunSpec, *, resume_step: int | None, is_main: bool = True) -> RunSpec:
    """Checks a resume against the stored spec, then writes ``spec`` with the history extended.

    ``resume_step``: the checkpoint step about to be restored (None for a fresh run). Raises
    :class:`ConfigMismatch` naming every refused field; nothing is written then.
    """
    spec = dataclasses.replace(spec, config=as_json(spec.config), **{m: as_json(getattr(spec, m)) for m in MODELS})
    old = read(workdir) if resume_step is not None else None
    changed: dict[str, list] = {}
    if old is not None:
        if old.kind and old.kind != spec.kind:
            raise ConfigMismatch(f"{workdir}: the checkpoints are from a {old.kind!r} run, not {spec.kind!r}")
        changed = config_changes(old.config, spec.config)
        for name in MODELS:  # model configs may come from elsewhere (stage 2 reads the stage-1 run's ViT)
            if getattr(old, name) is not None:  # (absent from specs without the shared schema)
                changed |= {f"{name}.{k}": v for k, v in config_changes(getattr(old, name), getattr(spec, name) or {}).items()}
        refused = {k: v for k, v in changed.items()
                   if k.split(".")[0] in MODELS or not any(re.fullmatch(p, k) for p in RESUMABLE)}
        if refused:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
            raise ConfigMismatch(
                f"{workdir}: cannot resume step {resume_step} with a different {', '.join(refused)} ({lines}). "
                f"These fields shape the checkpoint or the data; train in a new workdir (or start from this "
                f"one with init) instead. Fields that may change on resume: steps, optim.lr and the schedule's "
                f"scalars, logging / checkpoint / eval cadence, mesh.")
        spec = dataclasses.replace(spec, history=list(old.history))
    entry = {"step": int(resume_step or 0), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if changed:
        entry["changed"] = changed
    spec.history.append(entry)
    if is_main:
        write(workdir, spec)
    return spec


def dataset_card(data_dir: str) -> dict | None:
    """The dataset card of a prepared data dir (``decipher prep``'s ``dataset_card.json``), if any."""
    from decipher_jax.data import pipelines as P

    try:
        card = os.path.normpath(os.path.join(P._dataset_dir(data_dir), "..", "..", "..", "dataset_card.json"))
    except FileNotFoundError:
        return None
    if not os.path.exists(card):
        return None
    with open(card) as f:
        return json.load(f)


def preprocessing(data_dir: str) -> dict | None:
    """The ``preprocessing`` block of the dataset card of a prepared data dir, if there is one."""
    card = dataset_card(data_dir)
    return None if card is None else card.get("preprocessing")
