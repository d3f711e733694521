"""``mae-timm shards {tiny-imagenet,imagefolder,fashion-mnist,hf-dataset} --src SRC --out DIR``: write WebDataset
shards; ``mae-timm shards index SRC``: an ``_info.json`` for shards another tool wrote; ``mae-timm shards verify
DIR``: check every shard against the sha256 its ``_info.json`` records."""

from __future__ import annotations

import argparse

from mae_timm.data import DataError, fashion_mnist, imagefolder, tiny_imagenet, write_source
from mae_timm.data.hf_dataset import hf_dataset
from mae_timm.data.shard_index import index_shards
from mae_timm.data.shards import verify_shards
from mae_timm.data.sources import FASHION_MNIST_ROOT
from mae_timm.data.tiny_imagenet import MAX_MEMBER_BYTES

SOURCES = ("tiny-imagenet", "imagefolder", "fashion-mnist", "hf-dataset")
DEFAULT_SPLITS = {"tiny-imagenet": "train,validation", "imagefolder": None, "fashion-mnist": "train,validation",
                  "hf-dataset": None}


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for source in SOURCES:
        _add_source_arguments(sources.add_parser(source, help=f"write shards of {source}"), source)
    verify = sources.add_parser("verify", help="check every shard of DIR against the sha256 in its _info.json; "
                                "exit code 1 names the bad ones")
    verify.add_argument("dir", help="shard directory (with _info.json)")
    index = sources.add_parser("index", help="write the _info.json of WebDataset shards another tool wrote "
                               "(webdataset.ShardWriter, img2dataset), reading them as they are")
    index.add_argument("src", help="a folder of .tar shards, a brace pattern (dir/shard-{000000..000009}.tar), or "
                       "comma-separated urls; local or http(s)")
    index.add_argument("--out", help="where _info.json goes (default: the shards' folder; local shards elsewhere "
                       "are linked into it; for http shards, copy the file beside them)")
    index.add_argument("--split", default="train", help="the split these shards are (index each split's shards)")
    index.add_argument("--label-key", default="auto", help="cls, json:FIELD (a field of the .json member), none, or "
                       "auto (cls when every sample has one, none when no sample has)")
    index.add_argument("--stats-samples", type=int, default=1000, help="images decoded for the mean / std, spread "
                       "over the shards (every image's header is read for sizes and counts)")
    index.add_argument("--name", help="dataset name recorded (default: the folder's name)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_source_arguments(parser: argparse.ArgumentParser, source: str) -> None:
    parser.add_argument("--src", help="tiny-imagenet: the zip, its folder or a URL (http/https/file); imagefolder: "
                        f"root/<split>/<class>/<image>; fashion-mnist: IDX folder (default {FASHION_MNIST_ROOT})")
    parser.add_argument("--out", required=True, help="shard directory (created; shards already complete and "
                        "matching the sha256 in its _info.json are kept, damaged ones rewritten)")
    parser.add_argument("--splits", help="comma-separated splits (train, validation, test); default: "
                        "train,validation (imagefolder: the split folders present)")
    parser.add_argument("--shard-size", type=int, default=5000, help="most samples per shard")
    parser.add_argument("--min-shards", type=int, default=16, help="fewest shards per split (for workers x ranks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train split's shuffle before writing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if source == "tiny-imagenet":
        parser.add_argument("--md5", help="expected md5 of the downloaded/given zip; 'none' skips the check "
                            "(default: the official md5 when the file is named tiny-imagenet-200.zip, else no check)")
        parser.add_argument("--download-dir", default="~/.cache/mae_timm", help="where a URL source is downloaded")
        parser.add_argument("--max-member-mb", type=float, default=MAX_MEMBER_BYTES / 2**20,
                            help="largest file read from the zip or folder, in MiB (larger ones are refused)")
    if source == "fashion-mnist":
        parser.add_argument("--limit", type=int, help="keep the first N images of each split")
    if source == "hf-dataset":
        parser.add_argument("--image-column", default="image", help="column of the images (Image feature or bytes)")
        parser.add_argument("--label-column", default="auto", help="column of the classes (ClassLabel names are "
                            "kept), 'none', or auto ('label' when there is one)")


def run(args: argparse.Namespace, name: str) -> int:
    if args.source == "verify":
        return _verify(args.dir)
    if args.source == "index":
        return _index(args)
    splits = args.splits or DEFAULT_SPLITS[args.source]
    splits = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    # DataError is a ValueError: mae_timm.cli prints it as one line, exit code 2
    if args.source == "tiny-imagenet":
        if not args.src:
            raise DataError("tiny-imagenet needs --src (the zip, its extracted folder, or a URL)")
        if not 0 < args.max_member_mb < 2**40:  # nan and inf fail this too
            raise DataError(f"--max-member-mb is {args.max_member_mb}; it must be a number above 0 and below 2**40")
        data = tiny_imagenet(args.src, splits, md5=args.md5, download_dir=args.download_dir, progress=not args.quiet,
                             max_member_bytes=int(args.max_member_mb * 2**20))
    elif args.source == "imagefolder":
        if not args.src:
            raise DataError("imagefolder needs --src (root/<split>/<class>/<image> or root/<class>/<image>)")
        data = imagefolder(args.src, splits)
    elif args.source == "hf-dataset":
        if not args.src:
            raise DataError("hf-dataset needs --src (a save_to_disk folder, a parquet file or a folder of them)")
        label_column = None if args.label_column == "none" else args.label_column
        data = hf_dataset(args.src, splits, image_column=args.image_column, label_column=label_column)
    else:
        data = fashion_mnist(args.src or FASHION_MNIST_ROOT, splits, limit=args.limit)
    for split, reason in data.skipped.items():
        print(f"{args.src}: {split}: skipped {reason}")
    for split, what in data.converted.items():
        print(f"{args.src}: {split}: {what}")
    info = write_source(args.out, data, shard_size=args.shard_size, min_shards=args.min_shards, seed=args.seed,
                        progress=not args.quiet)
    for split, entry in info["splits"].items():
        print(f"{args.out}: {split}: {entry['num_samples']} samples in {len(entry['filenames'])} shards")
    return 0


def _verify(directory: str) -> int:
    """Print a line per bad shard and a summary; 0 when every shard matches, 1 otherwise."""
    checked, bad = verify_shards(directory)
    for path, problem in bad.items():
        print(f"bad shard {path}: {problem}")
    print(f"{directory}: {checked - len(bad)} of {checked} shards match their sha256")
    return 1 if bad else 0


def _index(args: argparse.Namespace) -> int:
    """Index the shards, then a line of what was found and one per kind of sample left out."""
    info = index_shards(args.src, args.out, split=args.split, label_key=args.label_key,
                        stats_samples=args.stats_samples, name=args.name, progress=not args.quiet)
    entry = info["splits"][args.split]
    images = ", ".join(f"{n} {k}" for k, n in entry["image_keys"].items())
    print(f"{args.src}: {args.split}: {entry['num_samples']} samples in {len(entry['filenames'])} shards ({images}); "
          f"labels: {entry['label_key'] or 'none'}; mean/std from {entry['image_stats']['sampled_images']} images")
    for kind, found in entry["skipped"].items():
        print(f"{args.src}: {args.split}: {found['count']} {kind} (the loader skips them), first {found['first']}")
    return 0
