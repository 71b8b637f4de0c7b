"""Build the WordNet noun-supersense task: gloss (definition) -> one-token category.

Reads WordNet 3.0 ``data.noun`` and writes class-balanced, seeded, disjoint
``train.jsonl`` / ``eval.jsonl`` with {"prompt": "Definition: <gloss>\\nCategory:",
"completion": " <label>"}, plus ``labels.json`` and the WordNet ``LICENSE``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

# lex_filenum 03..28 in order; noun.Tops is renamed "entity" (" Tops" is two tokens).
LABELS = [
    "entity", "act", "animal", "artifact", "attribute", "body", "cognition",
    "communication", "event", "feeling", "food", "group", "location", "motive",
    "object", "person", "phenomenon", "plant", "possession", "process",
    "quantity", "relation", "shape", "state", "substance", "time",
]
FIRST_LEX_FILENUM = 3
# Example sentences follow `; "` (a few glosses use `: "` or `, "`; keep `(e.g., "...")`).
EXAMPLE_START = re.compile(r'(?<!e\.g\.)[;:,]\s*"')


def read_glosses(data_noun: Path) -> dict[str, list[str]]:
    """Map label -> unique glosses (file order), dropping glosses shared across labels."""
    labels_of: dict[str, set[str]] = {}
    for line in data_noun.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # licence header
            continue
        head, _, gloss = line.partition(" | ")
        label = LABELS[int(head.split()[1]) - FIRST_LEX_FILENUM]
        definition = EXAMPLE_START.split(gloss, maxsplit=1)[0].strip().rstrip(";").strip()
        if len(definition.split()) >= 3:
            labels_of.setdefault(definition, set()).add(label)
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    for definition, labels in labels_of.items():
        if len(labels) == 1:
            by_label[labels.pop()].append(definition)
    return by_label


def licence_text(copyright_file: Path) -> str:
    """The WordNet3.0 licence paragraph of the Debian copyright file, de-indented."""
    lines = copyright_file.read_text(encoding="utf-8").splitlines()
    start = lines.index("License: WordNet3.0") + 1
    body: list[str] = []
    for line in lines[start:]:
        if not line.startswith(" "):
            break
        body.append("" if line.strip() == "." else line[1:])
    header = ("The files in this directory are derived from WordNet 3.0 noun glosses "
              "and lexicographer file names (noun supersenses).\n\n")
    return header + "\n".join(body) + "\n"


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for gloss, label in rows:
            record = {"prompt": f"Definition: {gloss}\nCategory:", "completion": f" {label}"}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"),
                        help="data files of the wordnet-base Debian package (its copyright file is read from "
                             "../doc/wordnet-base/)")
    parser.add_argument("--out-dir", type=Path, default=Path("bilora_dist/assets/wordnet_supersense"))
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--eval-per-class", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-small", action="store_true",
                        help="leave out a class with fewer glosses than train + eval per class (else eval is filled first)")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    train: list[tuple[str, str]] = []
    evals: list[tuple[str, str]] = []
    labels = []
    for label, glosses in read_glosses(args.wordnet_dir / "data.noun").items():
        if args.skip_small and len(glosses) < args.eval_per_class + args.train_per_class:
            print(f"{label}: only {len(glosses)} glosses, left out", file=sys.stderr)
            continue
        labels.append(label)
        if len(glosses) < args.eval_per_class + args.train_per_class:
            print(f"warning: {label}: only {len(glosses)} glosses; eval filled first, "
                  f"train gets {len(glosses) - args.eval_per_class}", file=sys.stderr)
        picked = rng.sample(glosses, min(len(glosses), args.eval_per_class + args.train_per_class))
        evals += [(g, label) for g in picked[: args.eval_per_class]]
        train += [(g, label) for g in picked[args.eval_per_class:]]
    rng.shuffle(train)
    rng.shuffle(evals)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "eval.jsonl", evals)
    (args.out_dir / "labels.json").write_text(json.dumps(labels) + "\n", encoding="utf-8")
    (args.out_dir / "LICENSE").write_text(licence_text(args.wordnet_dir.parent / "doc" / "wordnet-base" / "copyright"), encoding="utf-8")
    print(f"wrote {len(train)} train / {len(evals)} eval examples to {args.out_dir}")


if __name__ == "__main__":
    main()
