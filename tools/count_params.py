"""Print a preset's parameter count without allocating its weights (meta device).

    python tools/count_params.py --config configs/xl.yaml [section.key=value ...]
"""

from __future__ import annotations

import sys

from megatron_speech.config import load_config, parse_cli
from megatron_speech.models.wav2vec2.factory import count_parameters


def main(argv: list[str]) -> int:
    path, overrides, want_help = parse_cli(argv)
    if want_help:
        print(__doc__)
        return 0
    cfg = load_config(path, overrides)
    n = count_parameters(cfg.model)
    print(f"{path}: {n:,} parameters ({n / 1e6:.1f}M), pre-training model at TP=1")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
