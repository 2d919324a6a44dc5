"""Where the CPU training step's time goes: a profile of our backbone step (jax.profiler, XLA:CPU's
per-kernel trace events) beside MONAI's (torch.profiler), same shapes, aggregated by kind of op.

    python benchmarks/profile_step.py [--variant S/16 --size 64 --batch 2 --steps 5]

Ours: the compiled step's HLO names every kernel the trace shows; each is classed by the opcode
of its instruction (a fusion by what it fuses: a matmul, a reduction, or elementwise / layout
work). MONAI: torch's operator table (self CPU time), classed the same way. Times are per step,
the mean over ``--steps`` profiled steps after warm-up. The two libraries run on the same cores
with the same thread count.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import machine, table  # noqa: E402

KINDS = ("matmul", "convolution", "reduction", "elementwise / layout", "copy / transpose", "other")


def _hlo_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind, for every instruction of the optimised module; a fusion is a
    matmul if it contains a dot, a convolution if a convolution, else a reduction if it reduces."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+.*\{\s*$", line)
        if m and "=" not in line.split("{")[0]:
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None:
            comps[cur].append(line)

    def ops(comp: str, seen=()) -> set[str]:
        out = set()
        for line in comps.get(comp, []):
            m = re.search(r"=\s*[^ ]+\s+([\w\-]+)\(", line)
            if m:
                out.add(m.group(1))
            for c in re.findall(r"calls=%?([\w.\-]+)", line):
                if c not in seen:
                    out |= ops(c, seen + (comp,))
        return out

    kinds = {}
    for comp, lines in comps.items():
        for line in lines:
            m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^ ]+\s+([\w\-]+)\(", line)
            if not m:
                continue
            name, op = m.groups()
            inner = set()
            for c in re.findall(r"calls=%?([\w.\-]+)", line):
                inner |= ops(c)
            body = inner | {op}
            kinds[name] = ("matmul" if "dot" in body or "custom-call" in body and "matmul" in line
                           else "convolution" if "convolution" in body
                           else "reduction" if "reduce" in body or "reduce-window" in body
                           else "copy / transpose" if op in ("copy", "transpose")
                           else "elementwise / layout" if op == "fusion" or op in (
                               "add", "multiply", "subtract", "divide", "exponential", "tanh", "select", "broadcast",
                               "reshape", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice", "pad")
                           else "other")
    return kinds


def ours(args):
    import train_step

    dim, depth, heads, mlp = train_step.VARIANTS[args.variant.split("/")[0]]
    compiled, run = train_step.ours_backbone_step(args, args.batch, dim, depth, heads, mlp)
    kinds = _hlo_kinds(compiled.as_text())
    for _ in range(3):
        run()
    d = tempfile.mkdtemp(prefix="decipher_profile_")
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
        for _ in range(args.steps):
            run()
    wall = (time.perf_counter() - t0) / args.steps
    path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    prof = jax.profiler.ProfileData.from_file(path)
    per_kind, per_name, unmatched = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in prof.planes:
        if "Host" not in plane.name and "CPU" not in plane.name:
            continue
        for line in plane.lines:
            for ev in line.events:
                name = ev.name.split(":")[0]
                k = kinds.get(name)
                if k is None:
                    unmatched[name] += ev.duration_ns
                    continue
                per_kind[k] += ev.duration_ns
                per_name[name] += ev.duration_ns
    return wall, per_kind, per_name, unmatched


def monai(args):
    import torch
    from monai.networks.nets import ViT

    dim, depth, heads, mlp = __import__("train_step").VARIANTS[args.variant.split("/")[0]]
    p = int(args.variant.split("/")[1])
    m = ViT(1, (args.size,) * 3, (p,) * 3, hidden_size=dim, mlp_dim=mlp, num_layers=depth, num_heads=heads,
            dropout_rate=0.0)
    opt = torch.optim.AdamW(m.parameters(), 1e-4)
    x = torch.randn(args.batch, 1, args.size, args.size, args.size)

    def run():
        out, _ = m(x)
        (out.float() ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        run()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            run()
    wall = (time.perf_counter() - t0) / args.steps
    per_kind, per_name = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        n = e.key
        k = ("matmul" if re.search(r"aten::(mm|addmm|bmm|matmul|linear|baddbmm)$", n)
             else "convolution" if "conv" in n
             else "reduction" if re.search(r"aten::(sum|mean|softmax|_softmax|native_layer_norm|layer_norm|"
                                           r"native_layer_norm_backward|_softmax_backward_data|norm)", n)
             else "copy / transpose" if re.search(r"aten::(copy_|clone|contiguous|transpose|permute|t)$", n)
             else "elementwise / layout" if n.startswith("aten::")
             else "other")
        us = e.self_cpu_time_total
        per_kind[k] += us * 1000
        per_name[n] += us * 1000
    return wall, per_kind, per_name


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="S/16")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--remat", default="none")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--layers", default="unrolled", choices=["unrolled", "scan"], help="our layer loop")
    args = p.parse_args(argv)
    args.scan = args.layers == "scan"
    ow, ok, on, unmatched = ours(args)
    mw, mk, mn = monai(args)
    n = args.steps
    print(f"# backbone step ViT-{args.variant} {args.size}^3 batch {args.batch} ({args.layers} layers), forward + "
          "backward + AdamW; "
          f"{machine()}; {jax.__version__}")
    rows = [[k, f"{ok[k] / n / 1e6:.1f}", f"{mk[k] / n / 1e6:.1f}"] for k in KINDS]
    rows.append(["sum of kernels (threads overlap)", f"{sum(ok.values()) / n / 1e6:.1f}", f"{sum(mk.values()) / n / 1e6:.1f}"])
    rows.append(["wall time per step (profiled)", f"{ow * 1e3:.1f}", f"{mw * 1e3:.1f}"])
    print(table(["kind", "ours ms/step", "MONAI eager ms/step"], rows))
    print(f"\n# ours, the {args.top} costliest kernels (ms/step)")
    print(table(["kernel", "ms"], [[k, f"{v / n / 1e6:.2f}"] for k, v in on.most_common(args.top)]))
    fam = collections.Counter()
    for k, v in on.items():
        fam[re.sub(r"\.\d+$", "", k)] += v
    print(f"\n# ours, by kernel family (the name XLA gives a fusion, without its number; ms/step)")
    print(table(["family", "kernels", "ms"], [[k, sum(re.sub(r"\.\d+$", "", x) == k for x in on), f"{v / n / 1e6:.2f}"]
                                             for k, v in fam.most_common(args.top)]))
    print(f"\n# MONAI, the {args.top} costliest operators (self CPU ms/step)")
    print(table(["operator", "ms"], [[k, f"{v / n / 1e6:.2f}"] for k, v in mn.most_common(args.top)]))
    if unmatched:
        print("\n# trace events not named after an HLO instruction (ms/step): "
              + ", ".join(f"{k} {v / n / 1e6:.1f}" for k, v in unmatched.most_common(6)))


if __name__ == "__main__":
    main()
