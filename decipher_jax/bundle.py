"""A shareable model bundle: a stage-2 run in one folder a colleague loads without our workdirs.

    decipher export --run outputs/demo/stage2 --out my_model
    model, params, spec = bundle.from_pretrained("my_model")       # as runs.load_align returns
    zs = ZeroShot(model, params, spec, model.mesh)                  # or decipher embed --run my_model

The folder holds:

    config.json                 format + version, the towers' configs, the text length, the step,
                                and every other file's size and SHA-256
    image_tower.safetensors     the 3D ViT (our parameter names)
    text_tower.safetensors      the BERT report encoder
    projections.safetensors     the two projections, the text centre, logit scale and bias
    preprocessing.json          what a volume must go through first (the dataset card's block)
    tokenizer/                  the tokenizer's files
    README.md                   the model card: data, steps, preprocessing, evaluation

Loading checks the format version (a newer bundle fails, naming the version) and each file's
size and hash (a truncated or corrupted file fails, naming the file). The image tower also
converts to a MONAI ViT state dict (:func:`decipher_jax.interop.monai_vit.export_monai`) and
the text tower to a Hugging Face BERT folder (:func:`decipher_jax.interop.hf_bert.save_pretrained`);
``decipher export --monai --hf`` writes both beside the bundle's own files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np

FORMAT = "decipher_jax.bundle"
FORMAT_VERSION = 1
CONFIG = "config.json"
PARTS = {"image_tower.safetensors": ("image",), "text_tower.safetensors": ("text",),
         "projections.safetensors": ("image_proj", "text_proj", "text_center", "text_adapter", "logit_scale",
                                     "logit_bias")}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class BundleError(ValueError):
    """A bundle that cannot be loaded: names the file and the problem."""


def is_bundle(path: str) -> bool:
    cfg = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        return True  # a bundle's config.json that does not parse: from_pretrained says why


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flat(params) -> dict[str, np.ndarray]:
    from decipher_jax.sharding import path_str

    out = {}
    jax.tree_util.tree_map_with_path(lambda p, x: out.__setitem__(path_str(p), np.asarray(jax.device_get(x))), params)
    return out


def export(run: str, out: str, *, step: int | None = None, monai: bool = False, hf: bool = False) -> str:
    """Writes the bundle of stage-2 run ``run`` into ``out`` (created; files written to a staging
    folder first, so an interrupted export leaves no half bundle under ``out``)."""
    from safetensors.numpy import save_file

    from decipher_jax import runs

    out = os.path.abspath(out)
    if os.path.exists(out) and not is_bundle(out):
        raise BundleError(f"{out}: exists and is not a model bundle; give a new folder (an old bundle is replaced)")
    model, params, spec = runs.load_align(run, step=step)
    if not (spec.get("preprocessing") or {}).get("volume_config"):
        raise BundleError(f"{run}: the run records no preprocessing (its data were not prepared by decipher prep); "
                          "a bundle without it could not prepare new files")
    if not any(os.path.exists(os.path.join(spec["tokenizer"], n)) for n in TOKENIZER_FILES):
        raise BundleError(f"{spec['tokenizer']}: none of the tokenizer files {TOKENIZER_FILES}")
    flat = _flat(params)
    stage = out + ".staging"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    for name, prefixes in PARTS.items():
        part = {k: v for k, v in flat.items() if k.split("/")[0] in prefixes}
        save_file(part, os.path.join(stage, name), metadata={"source": "decipher_jax", "run": os.path.abspath(run)})
    missing = sorted(k for k in flat if not any(k.split("/")[0] in p for p in PARTS.values()))
    if missing:
        raise RuntimeError(f"parameters {missing} belong to no bundle file")
    os.makedirs(os.path.join(stage, "tokenizer"))
    for name in TOKENIZER_FILES:
        src = os.path.join(spec["tokenizer"], name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(stage, "tokenizer", name))
    with open(os.path.join(stage, "preprocessing.json"), "w") as f:
        json.dump(spec.get("preprocessing"), f, indent=1)
    exports = {"monai_vit": "", "hf_bert": ""}
    if monai:
        from decipher_jax.interop.monai_vit import export_monai

        export_monai(model(params).image, os.path.join(stage, "monai_vit.safetensors"))
        exports["monai_vit"] = "monai_vit.safetensors"
    if hf:
        from decipher_jax.interop.hf_bert import save_pretrained

        save_pretrained(model(params).text, os.path.join(stage, "hf_bert"), spec["tokenizer"])
        exports["hf_bert"] = "hf_bert/"
    card = _model_card(run, spec, exports)
    with open(os.path.join(stage, "README.md"), "w") as f:
        f.write(card)
    files = sorted(os.path.relpath(os.path.join(d, n), stage) for d, _, ns in os.walk(stage) for n in ns)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "clip_align", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "step": int(spec["step"]), "vit": spec["vit"], "bert": spec["bert"], "towers": spec["towers"],
        "max_length": int(spec["config"]["data"]["max_length"]), "exports": exports,
        "files": {n: {"bytes": os.path.getsize(os.path.join(stage, n)), "sha256": _sha256(os.path.join(stage, n))}
                  for n in files},
    }
    with open(os.path.join(stage, CONFIG), "w") as f:
        json.dump(config, f, indent=1)
    old = out + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out):  # an earlier bundle (checked above): set aside until the new one is in place
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_config(path: str) -> dict:
    """The bundle's ``config.json``, its version and every listed file checked."""
    cfg_path = os.path.join(path, CONFIG)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise BundleError(f"{cfg_path}: not found; {path} is not a model bundle") from None
    except ValueError as e:
        raise BundleError(f"{cfg_path}: not valid JSON ({e}); the bundle is corrupted") from None
    if cfg.get("format") != FORMAT:
        raise BundleError(f"{cfg_path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    version = cfg.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{cfg_path}: bundle format version {version!r} is newer than this decipher_jax reads "
                          f"({FORMAT_VERSION}); upgrade decipher_jax")
    files = cfg.get("files")
    if not isinstance(files, dict) or not all(isinstance(m, dict) and {"bytes", "sha256"} <= set(m) for m in files.values()):
        raise BundleError(f"{cfg_path}: the file list is malformed; the bundle is corrupted")
    for name, meta in files.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise BundleError(f"{p}: missing from the bundle")
        size = os.path.getsize(p)
        if size != meta["bytes"]:
            raise BundleError(f"{p}: {size:,} bytes, the bundle lists {meta['bytes']:,} (truncated or replaced)")
        if _sha256(p) != meta["sha256"]:
            raise BundleError(f"{p}: SHA-256 differs from the bundle's record (corrupted)")
    for name in PARTS:
        if name not in cfg.get("files", {}):
            raise BundleError(f"{cfg_path}: lists no {name}")
    return cfg


def spec(path: str) -> dict:
    """A run-spec-shaped dict of a bundle (what :class:`decipher_jax.zeroshot.ZeroShot` and
    :class:`decipher_jax.inference.Embedder` read)."""
    cfg = read_config(path)
    with open(os.path.join(path, "preprocessing.json")) as f:
        pre = json.load(f)
    return {"kind": "clip_align", "vit": cfg["vit"], "bert": cfg["bert"], "towers": cfg["towers"],
            "tokenizer": os.path.join(path, "tokenizer"), "preprocessing": pre, "step": cfg["step"],
            "config": {"data": {"max_length": cfg["max_length"]}}, "bundle": os.path.abspath(path)}


def from_pretrained(path: str, mesh=None):
    """``(model, params, spec)`` of a bundle on ``mesh``, as :func:`decipher_jax.runs.load_align`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from decipher_jax import runs
    from decipher_jax import sharding as sh
    from decipher_jax.models import bert
    from decipher_jax.models.towers import TowersConfig, TwoTowers
    from decipher_jax.sharding import path_str
    from decipher_jax.state import Model

    s = spec(path)
    vit, bcfg = runs.align_vit_config(s), bert.BertConfig(**runs.from_json(s["bert"]))
    mesh = mesh or sh.make_mesh({"data": -1})
    model = Model(lambda r: TwoTowers(vit, bcfg, TowersConfig(**s["towers"]), rngs=r), mesh)
    arrays: dict[str, np.ndarray] = {}
    for name in PARTS:
        try:
            arrays |= load_file(os.path.join(path, name))
        except (SafetensorError, OSError) as e:
            raise BundleError(f"{os.path.join(path, name)}: cannot read ({e})") from None
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    seen = set()

    def put(p, shape, sharding):
        name = path_str(p)
        if name not in arrays:
            raise BundleError(f"{path}: no weights for parameter {name}")
        a = arrays[name]
        if a.shape != shape.shape:
            raise BundleError(f"{path}: parameter {name} has shape {a.shape}, the model expects {shape.shape}")
        seen.add(name)
        return jax.device_put(a.astype(shape.dtype), sharding)

    params = jax.tree_util.tree_map_with_path(put, shapes, model.shardings)
    if extra := sorted(set(arrays) - seen):
        raise BundleError(f"{path}: weights {extra[:5]} are not parameters of the configured model")
    return model, params, s


def _model_card(run: str, spec: dict, exports: dict) -> str:
    from decipher_jax import layout

    from decipher_jax import runspec

    data_dir = spec["config"].get("data", {}).get("dir", "")
    counts = ((runspec.dataset_card(data_dir) if data_dir else None) or {}).get("counts", {})
    pre = spec.get("preprocessing") or {}
    lines = [
        "# decipher_jax model bundle", "",
        f"A Decipher-MR style vision-language model (3D ViT image tower, BERT report tower, "
        f"{spec['towers']['objective']} alignment), exported from `{os.path.abspath(run)}` at step {spec['step']}.", "",
        "## Load", "", "```python", "from decipher_jax import bundle",
        "model, params, spec = bundle.from_pretrained(\"<this folder>\")", "```", "",
        "or `decipher embed --run <this folder> --images scan.nii.gz dicom_dir/ --out emb.npz`.", "",
        "## Training data", "",
    ]
    if counts:
        lines += ["| split | series | studies | patients |", "|---|---|---|---|"]
        lines += [f"| {s} | {c['series']} | {c['studies']} | {c['patients']} |" for s, c in counts.items()]
    else:
        lines += [f"Prepared data: `{data_dir or 'unknown'}` (no dataset card found)."]
    lines += ["", "## Model", "", f"- image tower: `{json.dumps(spec['vit'])}`",
              f"- text tower: `{json.dumps(spec['bert'])}`", f"- towers: `{json.dumps(spec['towers'])}`",
              f"- steps trained: {spec['step']}", "", "## Preprocessing", "",
              "Volumes go through `decipher prep`'s chain before the model (`decipher embed` applies it):", ""]
    lines += [f"- {k}: {v}" for k, v in pre.items() if k != "volume_config"] or ["- not recorded"]
    lines += ["", "## Evaluation", ""]
    pipeline_dir = layout.PipelineDir(os.path.dirname(os.path.abspath(run)))
    if os.path.exists(pipeline_dir.summary):
        with open(pipeline_dir.summary) as f:
            lines += ["From the pipeline's `summary.md`:", "", f.read().strip()]
    else:
        lines += ["No evaluation was found beside the run (run `decipher eval`, then export again)."]
    lines += ["", "## Other formats", "",
              "- image tower as a MONAI `monai.networks.nets.ViT` state dict: "
              + (f"`{exports['monai_vit']}`" if exports.get("monai_vit") else
                 "`decipher export --monai` (or `decipher_jax.interop.monai_vit.export_monai`)"),
              "- text tower as a Hugging Face BERT folder: "
              + (f"`{exports['hf_bert']}`" if exports.get("hf_bert") else
                 "`decipher export --hf` (or `decipher_jax.interop.hf_bert.save_pretrained`)"), ""]
    return "\n".join(lines)
