"""Build the quotation style-tuning task: short attributed quotations as plain-text records.

Reads the fortune files of the Debian ``fortunes`` package (``apt-get download fortunes``, ``dpkg -x``)
and writes seeded, disjoint ``train.jsonl`` / ``eval.jsonl`` of {"text": "<quotation>\\n-- <author>"}, with
the package's licence as ``LICENSE``. Only attributed quotations of at most ``--max-chars`` characters are kept.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

CATEGORIES = ("literature", "wisdom", "humorists", "art", "education", "love", "work")
ATTRIBUTION = re.compile(r"^\s*--\s*(.+)$")


def read_quotes(fortune_dir: Path, max_chars: int) -> list[str]:
    """Attributed quotations of the chosen categories, whitespace-normalised, duplicates dropped, file order."""
    seen: dict[str, None] = {}
    for category in CATEGORIES:
        for entry in (fortune_dir / category).read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [line for line in entry.strip("\n").splitlines() if line.strip()]
            if len(lines) < 2 or not ATTRIBUTION.match(lines[-1]):
                continue
            body = " ".join(" ".join(line.split()) for line in lines[:-1])
            author = " ".join(ATTRIBUTION.match(lines[-1]).group(1).split())
            text = f"{body}\n-- {author}"
            if len(text) <= max_chars and "\ufffd" not in text:
                seen.setdefault(text)
    return list(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fortunes", type=Path, required=True,
                        help="the package's fortune directory (…/usr/share/games/fortunes)")
    parser.add_argument("--copyright", type=Path, required=True, help="the package's copyright file")
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--eval", type=int, default=600)
    parser.add_argument("--max-chars", type=int, default=240)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    quotes = read_quotes(args.fortunes, args.max_chars)
    if len(quotes) < args.train + args.eval:
        raise SystemExit(f"error: {len(quotes)} quotations, fewer than --train + --eval")
    random.Random(args.seed).shuffle(quotes)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", quotes[:args.train]), ("eval", quotes[args.train:args.train + args.eval])):
        (args.out_dir / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (args.out_dir / "LICENSE").write_text(
        "The files in this directory are quotations selected from the fortune files of the Debian `fortunes` "
        f"package (categories: {', '.join(CATEGORIES)}),\nunder that package's licence:\n\n"
        + args.copyright.read_text(encoding="utf-8"))
    print(f"{len(quotes)} quotations; {args.train} train, {args.eval} eval -> {args.out_dir}")


if __name__ == "__main__":
    main()
