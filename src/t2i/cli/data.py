"""`t2i data`: dataset tools. `t2i data shapes` writes the procedural captioned-shapes dataset."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `data` command and its actions."""
    parser = subparsers.add_parser("data", help="dataset tools (captioned shapes generator)")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    shapes = actions.add_parser(
        "shapes",
        help="write captioned-shapes webdataset shards",
        description="Draw coloured shapes on a 3x3 grid with captions like 'a red circle in the top left' "
        "and write them as webdataset shards shapes-00000.tar plus split.json and README.md.",
    )
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--num", type=int, default=10000, help="number of images (default 10000)")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    shapes.add_argument(
        "--sizes", default=None, metavar="WxH,...",
        help="draw each image at one of these sizes, e.g. 48x24,24x48,32x32 (aspect-ratio buckets; replaces --size)",
    )  # fmt: skip
    shapes.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    shapes.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    shapes.add_argument(
        "--split", choices=("train", "heldout", "all"), default="train",
        help="train excludes the held-out combinations; heldout has only them (default train)",
    )  # fmt: skip
    parser.set_defaults(func=run, _parser=parser)


def run(args: argparse.Namespace) -> int:
    """Dispatch `t2i data ACTION`."""
    if getattr(args, "data_command", None) != "shapes":
        args._parser.print_help()
        return 2
    if args.sizes:
        return _write_sized(args)

    from t2i.data.shapes import write_shapes_dataset

    shards = write_shapes_dataset(args.out, args.num, args.size, args.seed, args.shard_size, args.split)
    print(
        f"wrote {args.num} images ({args.size}px, split {args.split}) to {len(shards)} shard(s) in {args.out}"
    )
    return 0


def _write_sized(args: argparse.Namespace) -> int:
    """`t2i data shapes --sizes WxH,...`: the dataset at several aspect ratios (`t2i.data.shapes_aspect`)."""
    from t2i.data.shapes_aspect import parse_sizes, write_aspect_shapes_dataset

    sizes = parse_sizes(args.sizes)
    shards = write_aspect_shapes_dataset(args.out, args.num, sizes, args.seed, args.shard_size, args.split)
    listed = ", ".join(f"{w}x{h}" for w, h in sizes)
    print(f"wrote {args.num} images ({listed}, split {args.split}) to {len(shards)} shard(s) in {args.out}")
    return 0
