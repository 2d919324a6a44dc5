"""The brain-tissue task end to end on the real MNI152 volume nilearn ships, prepared through
``decipher prep``: heads on a frozen (random-init) ViT learn grey / white matter on the left
hemisphere and segment the right one by sliding windows; the report shows the section."""

import json
import os

import jax
import numpy as np
import pytest

from decipher_jax import report
from decipher_jax import sharding as sh
from decipher_jax.models.vit3d import ViT3D, ViTConfig
from decipher_jax.state import Model


@pytest.fixture(scope="module")
def mni_prep(tmp_path_factory):
    pytest.importorskip("nilearn")
    from data_prep import manifest, prep, volume
    from decipher_jax.data import corpus

    d = tmp_path_factory.mktemp("mni")
    rows = [r for r in corpus.real_volumes(str(d / "real")) if r["series_id"] == "MNI152_T1"]
    m = manifest.write(str(d / "manifest.csv"), rows)
    res = prep.run(m, str(d / "prep"), prep.PrepConfig(volume=volume.VolumeConfig(target_spacing=(6.0,) * 3),
                                                            split_fractions=(1.0, 0.0, 0.0), workers=1), progress=False)
    return res.tfds_dir


def test_grey_white_matter_on_the_held_out_hemisphere(mni_prep, tmp_path):
    from decipher_jax.eval import segtasks

    mesh = sh.make_mesh({"data": -1})
    cfg = ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64, patch_size=(4, 4, 4), img_size=(16, 16, 16))
    model = Model(lambda r: ViT3D(cfg, rngs=r), mesh)
    encs = {"random init": (model, model.init(jax.random.key(0)))}
    res = segtasks.brain_tissue(encs, mni_prep, mesh, window=cfg.img_size, steps=120, batch=8, lrs=(1e-2,),
                                seeds=(0,), n_random=32)
    assert res["shape"][0] > cfg.img_size[0] and res["eval_windows"] > 1  # larger than a window: really tiled
    rows = {r["head"]: r for r in res["rows"]}
    assert set(rows) == {"linear", "decoder", "unetr"}
    # Real anatomy at 6 mm: the image-skip head segments both tissues of the unseen hemisphere.
    assert rows["unetr"]["dice_grey_matter"] > 0.6 and rows["unetr"]["dice_white_matter"] > 0.6, rows["unetr"]
    assert rows["unetr"]["dice_mean_fg"] > rows["linear"]["dice_mean_fg"]
    assert np.isfinite(rows["unetr"]["hd95_grey_matter_mm"])
    # Written out and rendered with an overlay figure.
    w = tmp_path / "run"
    os.makedirs(w / "eval" / "segmentation")  # the segmentation evaluator's files
    ex = res.pop("example")
    pred = ex["preds"][("random init", "unetr")]
    z = ex["image"].shape[2] // 2
    np.savez(w / "eval" / "segmentation" / "examples.npz", brain_tissue_image=ex["image"][None, :, :, z],
             brain_tissue_label=ex["label"][None, :, :, z], brain_tissue_pred=pred[None, :, :, z],
             brain_tissue_title=np.asarray("random init, unetr head"))
    with open(w / "eval" / "segmentation.json", "w") as f:
        json.dump({"brain_tissue": res, "lesions": {}}, f)
    html = open(report.build(str(w))).read()
    assert "Segmentation on frozen encoders" in html and "dice_grey_matter" in html and "<img" in html
