"""Decoding speed: our jitted greedy and beam search with and without the KV cache, against
transformers' ``generate`` (torch, eager) on the same GPT-2 weights, side by side in one run.

    .venv/bin/python benchmarks/decoding.py [--layers 6 --width 384 --batch 8 --prompt 32 --new 64]

The GPT-2 is built from a config with random weights (nothing downloaded), saved with
``save_pretrained`` and read by :mod:`decipher_jax.interop.hf_decoder`; greedy tokens are
checked equal between the three before timing. Each figure is the median of ``--repeats`` runs
after one warm-up (compilation excluded; reported apart).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from decipher_jax import env

    env.setup(devices=1, platform="cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks.common import machine, table
    from decipher_jax import decoding
    from decipher_jax.interop import hf_decoder

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.width,
                                     n_head=args.width // 64, n_positions=args.prompt + args.new)).eval()
    d = tempfile.mkdtemp()
    ref.save_pretrained(d)
    ours = hf_decoder.from_pretrained(d)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.prompt))
    x = ours.embed(jnp.asarray(ids))
    eos = args.vocab - 1  # never the argmax of these random models in practice: every row runs to --new

    def ours_run(method, cache):
        out = decoding.generate(ours, x, None, max_new_tokens=args.new, eos_id=eos, method=method,
                                num_beams=args.beams, use_cache=cache)
        return np.asarray(jax.block_until_ready(out["tokens"]))

    def hf_run(beams):
        with torch.no_grad():
            return ref.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, num_beams=beams,
                                eos_token_id=eos, pad_token_id=0).numpy()[:, args.prompt:]

    rows, tokens = [], {}
    for name, fn in [("ours, greedy, KV cache", lambda: ours_run("greedy", True)),
                     ("ours, greedy, no cache", lambda: ours_run("greedy", False)),
                     ("transformers generate, greedy (torch eager)", lambda: hf_run(1)),
                     (f"ours, beam {args.beams}, KV cache", lambda: ours_run("beam", True)),
                     (f"transformers generate, beam {args.beams}", lambda: hf_run(args.beams))]:
        t0 = time.perf_counter()
        tokens[name] = fn()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        rows.append([name, f"{med * 1000:.0f} ms", f"{args.batch * args.new / med:.0f}", f"{first:.1f} s"])
    greedy = [v for k, v in tokens.items() if "greedy" in k]
    same = all(np.array_equal(greedy[0], g) for g in greedy[1:])
    print(f"{machine()}; GPT-2 {args.layers} layers x {args.width}, vocab {args.vocab}; batch {args.batch}, prompt "
          f"{args.prompt}, {args.new} new tokens; greedy tokens equal across the three: {same}")
    print(table(["decoder", "median time", "new tokens / s", "first call (compile)"], rows))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
