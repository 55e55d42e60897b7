"""The ``bnlab`` command."""

from __future__ import annotations

import argparse
import sys


def _cmd_steps(args) -> int:
    from .experiments import four_steps

    four_steps.run(batch_size=args.batch_size, seed=args.seed)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab", description="Batch normalization done properly (Ioffe & Szegedy 2015).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("steps", help="BN's four steps worked on a real mini-batch of digits",
                       description="Print BN's four steps (mean, variance, normalize, "
                                   "scale and shift) on a mini-batch of MNIST digits.")
    p.add_argument("--batch-size", type=_positive_int, default=60,
                   help="mini-batch size m (default 60, as in the paper)")
    p.add_argument("--seed", type=int, default=0, help="which digits are drawn (default 0)")
    p.set_defaults(func=_cmd_steps)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
