"""Orbax checkpoints holding the train state *and* the Grain iterator state.

One ``CheckpointManager`` with two items: ``state`` (any pytree of jax arrays: parameters,
optimiser, EMA teacher, step, RNG) and ``iter`` (one JSON of ``iterator.get_state()`` per
data-loading process, written by ``grain.checkpoint.CheckpointHandler``). A checkpoint at
step s is written after batch s was consumed, so a resumed run continues with batch s + 1.
Restoring against an abstract target that carries shardings places arrays on any mesh.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


def manager(directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
            async_save: bool = True) -> ocp.CheckpointManager:
    if "://" not in directory:  # Orbax requires absolute local paths (gs:// and other URLs pass through)
        directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                        enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(
        directory, options=opts, item_names=("state", "iter"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "iter": grain.checkpoint.CheckpointHandler()},
    )


def save(mngr: ocp.CheckpointManager, step: int, state, iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
        items["iter"] = grain.checkpoint.CheckpointSave(iterator)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mngr: ocp.CheckpointManager, abstract_state, iterator=None, step: int | None = None):
    """Restores ``(step, state)`` (and sets ``iterator``'s position in place); None if empty."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
        items["iter"] = grain.checkpoint.CheckpointRestore(iterator)
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    return step, out["state"]


def restore_subtree(directory: str, abstract_subtree, step: int | None = None, item: str = "state"):
    """``(step, part)``: only the arrays named by ``abstract_subtree`` (for example
    ``{"teacher": {"backbone": ...}}`` out of a whole stage-1 state), placed on the shardings
    it carries. The rest of the checkpoint (optimiser, student, heads) is never read."""
    if "://" not in directory:
        directory = os.path.abspath(directory)
    if not os.path.isdir(directory) and "://" not in directory:
        raise FileNotFoundError(f"{directory}: no checkpoint directory")
    with ocp.CheckpointManager(directory, item_names=("state", "iter")) as mngr:
        step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: no checkpoint saved yet")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
    with ocp.PyTreeCheckpointer() as ckptr:
        part = ckptr.restore(os.path.join(directory, str(step), item),
                             args=ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args,
                                                         partial_restore=True))
    # partial_restore hands back what the checkpoint lacks as the abstract leaves themselves
    missing = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_flatten_with_path(part)[0]
               if isinstance(v, jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"{directory} (step {step}): the checkpoint lacks {len(missing)} of the arrays asked for, "
                         f"e.g. {', '.join(missing[:3])}: a run of another architecture or config?")
    return step, part
