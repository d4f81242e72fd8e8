"""Render the spoken digits "zero".."nine" with espeak-ng into one compressed .npz file.

The course ships the result as ``mmcourse/data/spoken_digits.npz``; run this again only
to change the voices or speeds (or to check that the rendering still works):

    python scripts/render_spoken_digits.py
    python scripts/render_spoken_digits.py --out /tmp/tiny.npz --voices en-us --speeds 170 --digits 1 7

Needs the ``espeak-ng`` program (``apt-get install espeak-ng``). The work is done by
:func:`mmcourse.data.speech.render_spoken_digits`; this file only parses the arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmcourse.data.speech import (
    CLIP_SECONDS,
    DEFAULT_SPEEDS,
    DEFAULT_VOICES,
    SAMPLE_RATE,
    render_spoken_digits,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "mmcourse" / "data" / "spoken_digits.npz"

logger = logging.getLogger("render_spoken_digits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz file")
    parser.add_argument(
        "--voices", nargs="+", default=list(DEFAULT_VOICES), help="espeak-ng voices"
    )
    parser.add_argument(
        "--speeds", nargs="+", type=int, default=list(DEFAULT_SPEEDS), help="words per minute"
    )
    parser.add_argument(
        "--digits", nargs="+", type=int, default=list(range(10)), help="digits to speak, 0..9"
    )
    parser.add_argument("--sample-rate", type=int, default=SAMPLE_RATE, help="output rate in Hz")
    parser.add_argument(
        "--clip-seconds", type=float, default=CLIP_SECONDS, help="padded clip duration"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Render, save, and log a one-line summary. Returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        data = render_spoken_digits(
            digits=args.digits,
            voices=args.voices,
            speeds=args.speeds,
            sample_rate=args.sample_rate,
            clip_seconds=args.clip_seconds,
        )
    except (FileNotFoundError, ValueError) as error:
        logger.error("error: %s", error)
        return 1
    path = data.save(args.out)
    seconds = data.lengths / data.sample_rate
    logger.info(
        "wrote %d clips (%d voices x %d speeds x %d digits; %.2f-%.2f s long) to %s (%.2f MB)",
        len(data),
        len(args.voices),
        len(args.speeds),
        len(args.digits),
        seconds.min(),
        seconds.max(),
        path,
        path.stat().st_size / 1e6,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
