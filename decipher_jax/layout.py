"""Where things live inside a workdir: the file and folder names, in one place.

Trainers write a workdir that runs, evaluation, the report and the CLI read back, and a
pipeline lays its stages' workdirs, data and results out under one folder; naming each file
here once keeps writers and readers agreeing. :class:`RunDir` is one trainer's workdir,
:class:`PipelineDir` a pipeline's (as ``decipher pipeline`` / ``decipher demo`` write it).

Workdirs may be ``gs://`` paths, so every path is a plain string built with ``os.path.join``
(pathlib would fold ``gs://`` into ``gs:/``). Nothing here touches the file system except
:meth:`RunDir.exists`.
"""

from __future__ import annotations

import dataclasses
import os

SPEC_FILE = "run_spec.json"  # a run's spec (decipher_jax.runspec)


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A trainer's workdir (``decipher train --workdir``)."""

    path: str

    @property
    def spec(self) -> str:
        """``run_spec.json``: what the run is (:mod:`decipher_jax.runspec`)."""
        return os.path.join(self.path, SPEC_FILE)

    @property
    def checkpoints(self) -> str:
        """The Orbax checkpoint folder (train state and data position)."""
        return os.path.join(self.path, "checkpoints")

    @property
    def metrics(self) -> str:
        """``metrics.jsonl``: one line of logged metrics per logged step."""
        return os.path.join(self.path, "metrics.jsonl")

    @property
    def tb(self) -> str:
        """The TensorBoard event folder."""
        return os.path.join(self.path, "tb")

    @property
    def hf_export(self) -> str:
        """A ``text_mlm`` run's Hugging Face export (``export_hf``): stage 2's text tower."""
        return os.path.join(self.path, "hf_export")

    @property
    def lock(self) -> str:
        """The lock file of the trainer holding the workdir."""
        return os.path.join(self.path, ".lock")

    def heldout(self, split: str) -> str:
        """``eval_<split>.json``: a ``clip_align`` run's held-out retrieval, by tag ("before", "after")."""
        return os.path.join(self.path, f"eval_{split}.json")

    def exists(self) -> bool:
        """Whether a trainer has started here (the run spec is written first)."""
        return os.path.exists(self.spec)


@dataclasses.dataclass(frozen=True)
class PipelineDir:
    """A pipeline's workdir: ``data/``, one :class:`RunDir` per train stage, ``eval/``, the summary
    and the report."""

    path: str

    @property
    def raw(self) -> str:
        """``data/raw``: the embedded corpus (volumes, reports, manifest) before prep."""
        return os.path.join(self.path, "data", "raw")

    @property
    def prep(self) -> str:
        """``data/prep``: the prepared records the stages train and evaluate on."""
        return os.path.join(self.path, "data", "prep")

    @property
    def multiparam_raw(self) -> str:
        """``data/multiparam/raw``: the multi-sequence brain corpus before prep (issue 22)."""
        return os.path.join(self.path, "data", "multiparam", "raw")

    @property
    def multiparam_prep(self) -> str:
        """``data/multiparam/prep``: its records, each study's series on one grid."""
        return os.path.join(self.path, "data", "multiparam", "prep")

    def run(self, stage: str) -> RunDir:
        """A train stage's workdir, named as the stage ("stage1_vision", "stage1_text", "stage2")."""
        return RunDir(os.path.join(self.path, stage))

    @property
    def eval(self) -> str:
        """The evaluators' folder."""
        return os.path.join(self.path, "eval")

    def result(self, name: str) -> str:
        """``eval/<name>.json``: an evaluator's result (or ``{"skipped": why}``)."""
        return os.path.join(self.eval, f"{name}.json")

    def arrays(self, name: str) -> str:
        """``eval/<name>/``: an evaluator's arrays for figures."""
        return os.path.join(self.eval, name)

    @property
    def features(self) -> str:
        """``eval/features``: the probes' cached features (``<encoder>/<split>/`` below)."""
        return os.path.join(self.eval, "features")

    @property
    def summary(self) -> str:
        """``summary.md``: the stages' lines."""
        return os.path.join(self.path, "summary.md")

    @property
    def report(self) -> str:
        """``report.html``: the default output of ``decipher report``."""
        return os.path.join(self.path, "report.html")
