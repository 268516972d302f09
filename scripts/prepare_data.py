"""Build the litdata shards the configs train on (idempotent; --force rebuilds).

python scripts/prepare_data.py                          # embedded digits -> data/digits
python scripts/prepare_data.py --source my.npz --out data/mine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from examples.digits.prepare import SplitSettings, prepare  # noqa: E402
from train_template.quiet import silence_known_messages  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--source", default="digits", help="'digits' or an .npz with images and labels"
    )
    parser.add_argument(
        "--out", default="data/digits", help="output directory for train/val/test shards"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="litdata.optimize workers (0: write in this process, no workers)",
    )
    parser.add_argument("--chunk-bytes", default="16MB", help="target size of one shard file")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the shards are up to date"
    )
    args = parser.parse_args(argv)
    silence_known_messages()
    settings = SplitSettings(args.seed, args.val_fraction, args.test_fraction)
    try:
        prepare(args.source, args.out, settings, args.force, args.num_workers, args.chunk_bytes)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
