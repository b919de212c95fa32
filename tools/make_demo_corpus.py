"""Build the embedded demo corpus: `python tools/make_demo_corpus.py --out DIR [--scale S] [--seed N]`.

docs/design.md §8 and §11 say what it holds and why.

Offline: espeak-ng, flite and sox (Debian) are required; Asterisk prompts and music are used when installed.
Exits 1, naming the Debian packages to install, when a required tool is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tools/ and bench/ are its packages

from tools.demo_corpus import MissingToolsError, build_demo_corpus, format_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (its corpus parts are rebuilt)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every count; 1.0 is about 2 hours")
    parser.add_argument("--seed", type=int, default=0, help="fixes every random choice (same seed, same corpus)")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    args = parser.parse_args(argv)
    try:
        summary = build_demo_corpus(args.out, scale=args.scale, seed=args.seed, num_workers=args.workers)
    except MissingToolsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
