"""Report generation and VQA: the sequence format, the vocabulary, a frozen image tower that
shapes the output, a short training run that learns, and the held-out evaluation with its
language-prior baseline."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decipher_jax.data import captions as C
from decipher_jax.models.captioner import Captioner, CaptionerConfig
from decipher_jax.models.decoder import DecoderConfig
from decipher_jax.models.vit3d import ViTConfig

@pytest.fixture(scope="module")
def prepared_val(tmp_path_factory):
    """28 synthetic patients at 5 mm: train, val (early stopping) and test splits."""
    from conftest import _prepare

    return _prepare(tmp_path_factory.mktemp("prepared_val"), n_patients=28, seed=5, splits=(0.6, 0.15, 0.25), workers=2)


VIT = dict(dim=32, depth=1, heads=2, mlp_dim=64, patch_size=(8, 8, 8), img_size=(16, 16, 16), stem="linear")


@pytest.fixture(scope="module")
def vocab(minilm_path):
    return C.SubVocab.build(minilm_path, ["No acute infarct. A 20 mm mass in the left frontal lobe."])


def test_sequence_masks_the_answer_and_its_end(vocab):
    q, a = "is there a lesion?", "yes"
    ids, labels, mask = C.sequence(vocab, q, a, 12)
    nq = len(vocab.encode(q))
    assert list(ids[: nq + 2]) == C.prompt(vocab, q, 12)  # generation starts exactly where training's answer does
    assert list(labels[mask > 0]) == vocab.encode(a) + [C.EOS]
    assert (labels[:-1][ids[1:] != C.PAD] == ids[1:][ids[1:] != C.PAD]).all()  # labels are the next tokens
    report = "No acute infarct. A 20 mm mass in the left frontal lobe."
    ids, labels, mask = C.sequence(vocab, "", report, 40)
    assert list(ids[:2]) == [C.BOS, C.SEP] and vocab.decode(labels[mask > 0]) == report.lower()
    _, _, cut = C.sequence(vocab, "", report, 6)  # too long: cut, no end token
    assert cut.sum() == 5
    # Retrieved reports before the question are cut from the front, as the prompt cuts them.
    long_q = C.with_context(q, report + " " + report)
    ids, labels, mask = C.sequence(vocab, long_q, a, 24)
    p = C.prompt(vocab, long_q, 24)
    assert len(p) == 24 // 2 + 2 and list(ids[: len(p)]) == p and p[-1 - nq: -1] == vocab.encode(q)
    assert list(labels[mask > 0]) == vocab.encode(a) + [C.EOS]


def test_vocabulary_round_trip_and_unknown_pieces(vocab):
    assert vocab.decode(vocab.encode("no acute infarct.") + [C.EOS] + vocab.encode("mass")) == "no acute infarct."
    assert C.UNK in vocab.encode("pneumothorax")  # a piece no training text used
    assert len(vocab) == len(C.SPECIAL) + len(vocab.pieces) < 200


def _captioner(use_image=True, seed=0):
    dec = DecoderConfig(family="llama", vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_position=64)
    return Captioner(ViTConfig(**VIT), dec, CaptionerConfig(use_image=use_image, num_latents=4, resampler_depth=1),
                     rngs=nnx.Rngs(seed))


def test_the_prefix_carries_the_image_and_only_the_image_tower_is_stopped(rng):
    m = _captioner()
    ids = jnp.asarray(rng.integers(5, 40, (2, 7)))
    a, b = (jnp.asarray(rng.standard_normal((2, 16, 16, 16, 1)), jnp.float32) for _ in range(2))
    la, lb = m(a, ids), m(b, ids)
    assert la.shape == (2, 7, 40) and float(jnp.abs(la - lb).max()) > 1e-3
    prior = _captioner(use_image=False)
    assert float(jnp.abs(prior(a, ids) - prior(b, ids)).max()) == 0.0 and prior.num_prefix == 0
    graphdef, state = nnx.split(m)

    def loss(s, freeze):
        return jnp.sum(nnx.merge(graphdef, s)(a, ids, freeze_image=freeze) ** 2)

    frozen, free = jax.grad(loss)(state, True), jax.grad(loss)(state, False)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(frozen["image"]))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(free["image"]))
    assert float(jnp.abs(frozen["resampler"]["latents"][...]).max()) > 0


def test_memory_distance_is_the_visual_maps_and_skips_the_series_itself(rng):
    """``Memory.distance`` is the visual localisation map's nearest-normal-patch distance (one group),
    a bank row that is the query itself is not its neighbour, and the distance reaches the prefix."""
    from decipher_jax.eval import localisation as L

    dec = DecoderConfig(family="llama", vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_position=64)
    m = Captioner(ViTConfig(**VIT), dec, CaptionerConfig(num_latents=4, resampler_depth=1, anomaly_bank=5),
                  rngs=nnx.Rngs(0))
    bank = rng.standard_normal((5, 8, 32)).astype(np.float32)
    m.memory.bank[...] = jnp.asarray(bank)
    tok = rng.standard_normal((3, 8, 32)).astype(np.float32)
    tok[1] = bank[2]  # a series that is in the bank
    got = np.asarray(m.memory.distance(jnp.asarray(tok)))
    want = L.visual_map(tok, ["g"] * 3, bank, ["g"] * 5, (2, 2, 2)).reshape(3, 8)
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], atol=1e-5)
    assert float(want[1].max()) < 1e-5  # with itself in the bank it would be at distance 0 ...
    without = L.visual_map(tok[1:2], ["g"], np.delete(bank, 2, 0), ["g"] * 4, (2, 2, 2)).reshape(8)
    np.testing.assert_allclose(got[1], without, atol=1e-5)  # ... but is scored against the others
    assert float(got[1].min()) > 0.3
    # reach 1 on a 2x2x2 grid: every position neighbours every other; reach 0: the same position only
    m0 = Captioner(ViTConfig(**VIT), dec, CaptionerConfig(num_latents=4, resampler_depth=1, anomaly_bank=5,
                                                         anomaly_reach=0), rngs=nnx.Rngs(0))
    m0.memory.bank[...] = jnp.asarray(bank)
    np.testing.assert_allclose(np.asarray(m0.memory.distance(jnp.asarray(tok)))[[0, 2]],
                               L.visual_map(tok[[0, 2]], ["g"] * 2, bank, ["g"] * 5, (2, 2, 2), reach=0).reshape(2, 8),
                               atol=1e-5)
    # The prefix reads the distance: the same image against a bank that holds its tokens or not.
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 16, 1)), jnp.float32)
    own = np.asarray(m.image(x)["patch"])
    m.memory.bank[...] = jnp.asarray(np.concatenate([own[:1] + 5e-2 * rng.standard_normal(own[:1].shape), bank[:4]]))
    near_prefix = np.asarray(m.prefix(x))
    m.memory.bank[...] = jnp.asarray(bank)
    assert float(np.abs(near_prefix[0] - np.asarray(m.prefix(x))[0]).max()) > 1e-4
    # ... in the latents and in the summary token after them, which also reads where the maximum is
    assert near_prefix.shape[1] == m.num_prefix == 4 + 1
    dist = np.full((2, 8), 0.1, np.float32)
    dist[0, 0] = dist[1, 7] = 0.4  # the same maximum and mean, at opposite corners
    sm = np.asarray(m.memory.summary(jnp.asarray(dist)))
    assert sm.shape == (2, 1, 32) and float(np.abs(sm[0] - sm[1]).max()) > 1e-4


def test_memory_needs_its_bank_frozen(prepared_val):
    from decipher_jax.trainers import caption, common

    cfg = _cfg(prepared_val)
    cfg.optim.lr_rules = [("image/.*", None)]
    with pytest.raises(ValueError, match="memory/bank"):
        caption.setup(cfg, common.make_mesh(cfg, "t"))
    cfg.optim.lr_rules = [("image/.*", 0.1), ("memory/bank", None)]  # a tower that learns would leave the bank stale
    with pytest.raises(ValueError, match="must stay frozen"):
        caption.setup(cfg, common.make_mesh(cfg, "t"))
    cfg = _cfg(prepared_val)
    cfg.model.vit = {**VIT, "dtype": "bfloat16"}  # the self-exclusion compares recomputed float32 tokens
    with pytest.raises(ValueError, match="float32 image tower"):
        caption.setup(cfg, common.make_mesh(cfg, "t"))


def _cfg(data, prior=False, steps=80):
    from decipher_jax.trainers import common

    cfg = common.load_config(f"experiments/configs/caption.py:tiny{',prior' if prior else ''}",
                             {"data.dir": data, "init.align": "", "steps": steps, "log_every": 10,
                              "checkpoint_every": 20, "data.batch_size": 8, "data.max_length": 80,
                              "optim.warmup_steps": 5, "optim.lr": 3e-3, "eval.every": 40, "eval.patience": 5})
    cfg.model.vit = VIT
    # The image-conditioned run has the memory of normal studies' patches (6 rows).
    cfg.model.captioner = dict(num_latents=4, resampler_depth=1, resampler_heads=4, anomaly_bank=0 if prior else 6)
    cfg.model.decoder = dict(family="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=128, max_position=128)
    return cfg


@pytest.fixture(scope="module")
def trained(prepared_val, tmp_path_factory):
    from decipher_jax.trainers import caption

    d = tmp_path_factory.mktemp("caption")
    runs = {}
    for name, prior in (("model", False), ("prior", True)):
        w = str(d / name)
        caption.train(_cfg(prepared_val, prior=prior), w)
        runs[name] = w
    return runs


def test_training_lowers_the_loss_and_keeps_the_tower_frozen(trained, prepared_val):
    import json

    from decipher_jax import checkpoint as ckpt
    from decipher_jax.trainers import caption, common

    with open(os.path.join(trained["model"], "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert losses[-1] < 0.7 * losses[0], losses
    # The image tower is the init's (here the seed's random init), bitwise, and has no optimiser state.
    s = caption.setup(_cfg(prepared_val), common.make_mesh(_cfg(prepared_val), "t"))
    fresh = s.init()
    _, restored = ckpt.restore_subtree(os.path.join(trained["model"], "checkpoints"), {"params": s.abstract_state()["params"]})
    for a, b in zip(jax.tree.leaves(fresh["params"]["image"]), jax.tree.leaves(restored["params"]["image"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not any("image" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(fresh["opt"]))
    assert s.frozen == {"image": True}
    # The memory's bank: the tower's tokens of training series without findings, kept as filled (no
    # optimiser state), while the distance's embedding learns.
    bank = np.asarray(restored["params"]["memory"]["bank"])
    np.testing.assert_array_equal(np.asarray(fresh["params"]["memory"]["bank"]), bank)
    assert bank.shape == (6, 8, 32) and float(np.abs(bank).max()) > 0
    assert not any("bank" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(fresh["opt"]))
    assert float(np.abs(np.asarray(restored["params"]["memory"]["w2"]) - np.asarray(fresh["params"]["memory"]["w2"])).max()) > 0
    # Early stopping on the val split: two evaluations, the best step's parameters kept and read back.
    with open(os.path.join(trained["model"], "best.json")) as f:
        best = json.load(f)
    assert sorted(map(int, best["evals"])) == [40, 80] and best["step"] in (40, 80)
    assert best["score"] == max(best["evals"].values()) and best["score"] < 0
    from decipher_jax import captioning

    cm = captioning.CaptionModel.from_workdir(trained["model"])
    assert cm.spec["step"] == best["step"]


def test_held_out_evaluation_with_the_prior(trained, prepared_val):
    from decipher_jax import captioning
    from decipher_jax.eval import textgen

    res = captioning.evaluate(trained["model"], prepared_val, "test", prior=trained["prior"], max_series=12)
    assert set(res["systems"]) == {"model", "prior"} and res["n_series"] == 12
    assert res["patients_disjoint_from_train"]
    for s in res["systems"].values():
        assert 0.0 <= s["rougeL"] <= 1.0 and "tok:13a" in s["bleu"]["signature"]
        assert set(s["vqa"]) >= {"lesion", "region", "sequence"}
    ex = res["examples"][0]
    assert ex["generated"] and ex["stated"] == textgen.mentions(ex["generated"])
    # The examples are the model's own greedy reports of those series, and score as they should.
    cm = captioning.CaptionModel.from_workdir(trained["model"])
    rows = captioning.read_split(prepared_val, "test", 4)
    gen = cm.generate(rows["volume"][:2])
    assert [e["generated"] for e in res["examples"][:2]] == gen
    assert res["systems"]["model"]["rougeL"] > 0.0
    assert captioning.summary(res)[1].startswith("  model: BLEU-4")


def test_prefix_generation_with_and_without_the_cache_agree(trained, prepared_val):
    from decipher_jax import captioning
    from decipher_jax.eval import textgen

    cm = captioning.CaptionModel.from_workdir(trained["model"])
    rows = captioning.read_split(prepared_val, "test", 3)
    # Prompts of different lengths: left padding between the image prefix and the text.
    qs = ["", textgen.QUESTIONS["lesion"], textgen.QUESTIONS["size"]]
    for method in ("greedy", "beam"):
        a = cm.generate(rows["volume"], qs, method=method, num_beams=3, max_new_tokens=16)
        b = cm.generate(rows["volume"], qs, method=method, num_beams=3, max_new_tokens=16, use_cache=False)
        assert a == b and any(a), (method, a, b)


def test_caption_and_ask_commands(trained, prepared_val, tmp_path, capsys):
    import json

    from decipher_jax import captioning, cli

    out = str(tmp_path / "c.json")
    assert cli.main(["caption", "--workdir", trained["model"], "--data", prepared_val, "--max-series", "3",
                     "--out", out, "--show", "1"]) == 0
    with open(out) as f:
        res = json.load(f)
    assert res["n_series"] == 3 and "model" in res["systems"]
    assert "reference:" in capsys.readouterr().out
    rows = captioning.read_split(prepared_val, "test", 1)
    assert cli.main(["ask", "--workdir", trained["model"], "--data", prepared_val, "--series",
                     rows["series_id"][0], "is", "there", "a", "lesion?"]) == 0
    cm = captioning.CaptionModel.from_workdir(trained["model"])
    want = cm.generate(rows["volume"], ["is there a lesion?"])[0]
    assert capsys.readouterr().out.strip() == want
    assert cli.main(["ask", "--workdir", trained["model"], "--data", prepared_val, "--series", "nope"]) == 2


def test_evaluator_and_report_section(trained, prepared_val, tmp_path):
    from decipher_jax import report
    from decipher_jax.eval import evaluators

    ctx = evaluators.Context(out=str(tmp_path), data=prepared_val, random=False,
                             runs={"caption": trained["model"], "caption_prior": trained["prior"]})
    res = evaluators.run_all(evaluators.from_config({"caption": {"max_series": 3}}), ctx, say=lambda s: None)
    assert set(res["caption"]["systems"]) == {"model", "prior"}
    page = open(report.build(str(tmp_path))).read()
    assert "Report generation and VQA" in page and "language prior (no image)" in page
    assert res["caption"]["examples"][0]["generated"] in page.replace("&#x27;", "'")
    skipped = evaluators.run_all(evaluators.from_config({"caption": {}}),
                                 evaluators.Context(out=str(tmp_path / "none"), data=prepared_val, random=False),
                                 say=lambda s: None)
    assert "no caption run" in skipped["caption"]["skipped"]


def test_retrieved_reports_skip_the_own_patient_and_repeats(monkeypatch):
    from decipher_jax import captioning, zeroshot

    emb = np.eye(4, dtype=np.float32)
    train = {"image": emb, "text": emb, "series_id": np.array(["a1", "a2", "b1", "c1"]),
             "patient_id": np.array(["A", "A", "B", "C"]), "report": np.array(["ra", "ra", "rb", "rc"])}
    query = {"image": np.array([[1.0, 0.9, 0.5, 0.0]], np.float32), "series_id": np.array(["t1"]),
             "patient_id": np.array(["T"])}

    class Fake:
        def embed_pairs(self, data_dir, split):
            return train if split == "train" else query

    monkeypatch.setattr(zeroshot.ZeroShot, "from_workdir", classmethod(lambda cls, w: Fake()))
    # A held-out series: the best-ranked reports, each text once (a1 and a2 share a study's report).
    assert captioning.retrieved_reports("run", "data", "test", 2) == {"t1": "ra rb"}
    # A training series never reads its own patient's report.
    got = captioning.retrieved_reports("run", "data", "train", 1)
    assert got["a1"] in ("rb", "rc") and got["a2"] != "ra" and got["b1"] != "rb"


def test_examples_put_the_retrieved_report_before_the_question(vocab):
    ex = {"series_id": "s1", "report": "No acute infarct.", "qa": {"lesion": "no"}}
    rng = np.random.default_rng(0)
    plain = C.Examples(vocab, 40, report_fraction=0.0).random_map(dict(ex), rng)
    rag = C.Examples(vocab, 40, report_fraction=0.0, context={"s1": "A 20 mm mass."}).random_map(dict(ex), rng)
    n = int((rag["ids"] != C.PAD).sum()) - int((plain["ids"] != C.PAD).sum())
    assert n == len(vocab.encode("A 20 mm mass."))
    assert vocab.decode(rag["ids"][1:1 + n]) == "a 20 mm mass."
    np.testing.assert_array_equal(rag["labels"][rag["loss_mask"] > 0], plain["labels"][plain["loss_mask"] > 0])


def test_config_variants():
    from decipher_jax.trainers import common

    load = lambda arg: common.load_config(f"experiments/configs/caption.py:{arg}")  # noqa: E731
    tiny, rag, prior, full = load("tiny"), load("tiny,rag"), load("tiny,prior"), load("")
    assert rag.data.retrieve == 1 and rag.data.max_length == 2 * tiny.data.max_length and tiny.data.retrieve == 0
    assert not prior.model.use_image and prior.init.align == "" and tiny.model.use_image
    assert full.model.decoder["scan"] and full.steps > tiny.steps
    assert full.optim.lr_rules == prior.optim.lr_rules == [("image/.*", None)]  # as before the memory: runs resume
    assert tiny.optim.lr_rules == [("image/.*", None), ("memory/bank", None)]
    # the memory: on by default at the tiny sizes, off in the full config and the prior unless asked for
    banks = {a: load(a).model.captioner["anomaly_bank"] for a in ("tiny", "tiny,nomemory", "tiny,prior", "", "memory")}
    assert banks == {"tiny": 128, "tiny,nomemory": 0, "tiny,prior": 0, "": 0, "memory": 1024}
    for bad in ("prior,rag", "prior,memory", "memory,nomemory", "huge"):
        with pytest.raises(ValueError, match="caption.py"):
            load(bad)


def test_val_selection_on_the_answers_alone(trained, prepared_val):
    from decipher_jax import checkpoint as ckpt
    from decipher_jax.trainers import caption, common

    cfg = _cfg(prepared_val)
    s = caption.setup(cfg, common.make_mesh(cfg, "t"))
    vocab = C.SubVocab(caption.tokenizer_path(cfg), caption.runs.read_spec(trained["model"])["config"]["vocab"])
    ex = caption.val_examples(cfg, vocab, tuple(VIT["img_size"]))
    reports = ex["is_question"] == 0
    assert reports.any() and (~reports).any() and (ex["ids"][reports][:, 1] == C.SEP).all()
    _, part = ckpt.restore_subtree(os.path.join(trained["model"], "checkpoints"), {"params": s.abstract_state()["params"]})
    losses = {}
    for select in ("all", "answers"):
        cfg.eval.select = select
        losses[select] = caption.BestVal(cfg, s.model, s.mesh, vocab, tuple(VIT["img_size"])).evaluate(part["params"], "val")[0]["loss"]
    assert np.isfinite(losses["all"]) and np.isfinite(losses["answers"]) and losses["all"] != losses["answers"]


def test_answer_weight_scales_the_answers_alone_and_the_loss_is_their_weighted_mean(vocab):
    from decipher_jax.trainers.caption import token_loss

    ex = {"series_id": "s1", "report": "No acute infarct.", "qa": {"lesion": "no"}}
    q = C.Examples(vocab, 40, report_fraction=0.0, answer_weight=5.0).random_map(dict(ex), np.random.default_rng(0))
    r = C.Examples(vocab, 40, report_fraction=1.0, answer_weight=5.0).random_map(dict(ex), np.random.default_rng(0))
    assert set(np.unique(q["loss_mask"])) == {0.0, 5.0} and set(np.unique(r["loss_mask"])) == {0.0, 1.0}
    # the loss: sum of w * nll over sum of w; the accuracy counts each masked position once
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (2, 6))
    mask = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 5, 5, 0, 0]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    loss, acc = token_loss(logits, labels, mask)
    assert float(loss) == pytest.approx(float((nll * mask).sum() / mask.sum()), rel=1e-5)
    assert float(acc) == pytest.approx(float(((logits.argmax(-1) == labels) * (mask > 0)).sum() / 4))


def test_summary_of_a_finished_run_resumed_names_it_and_of_a_trained_one_gives_its_loss():
    from decipher_jax.trainers import caption, common

    cfg = common.load_config("experiments/configs/caption.py:tiny")
    done = caption.summary(cfg, {"val_loss": 0.3, "best_step": 900}, 1.0)  # resumed at its end: no step ran
    assert "already trained" in done and "0.300 at step 900" in done
    ran = caption.summary(cfg, {"loss": 0.25, "token_acc": 0.9}, 10.0)
    assert "training answer-token loss 0.250" in ran and "accuracy 0.900" in ran
