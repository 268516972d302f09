"""Build the language-model token shards from the Python standard library's source
(idempotent; --force rebuilds). `train.py fit --config configs/lm.yaml` runs this itself
when data/stdlib is missing.

python scripts/prepare_lm_data.py                     # -> data/stdlib
python scripts/prepare_lm_data.py --root /path/to/pyfiles --out data/mine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from examples.lm.prepare import prepare  # noqa: E402
from train_template.quiet import silence_known_messages  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="data/stdlib", help="output directory")
    parser.add_argument(
        "--root", default=None, help="folder of .py files (default: this Python's stdlib)"
    )
    parser.add_argument("--val-percent", type=float, default=2.0, help="share of files for val")
    parser.add_argument("--test-percent", type=float, default=1.0, help="share of files for test")
    parser.add_argument("--num-workers", type=int, default=1, help="litdata.optimize workers")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    silence_known_messages()
    if args.root is not None and not Path(args.root).is_dir():
        print(
            f"error: --root {args.root} is not a folder: pass a folder of .py files",
            file=sys.stderr,
        )
        return 2
    prepare(
        args.out,
        root=args.root,
        val_percent=args.val_percent,
        test_percent=args.test_percent,
        num_workers=args.num_workers,
        force=args.force,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
