"""The ``decipher`` command: thin entry points over importable functions.

    decipher demo --workdir outputs/demo     # the main job, end to end, at tiny scale

Subcommands import their dependencies lazily so that ``--help`` is instant and environment
variables (XLA_FLAGS, JAX_PLATFORMS) set by the caller take effect before jax starts.
"""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from decipher_jax import demo

    return demo.run(args.workdir, devices=args.devices)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="decipher", description="Decipher-MR in JAX: 3D MRI foundation models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the whole pipeline at tiny scale on the embedded data")
    p.add_argument("--workdir", default="outputs/demo")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices when running on the CPU")
    p.set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
