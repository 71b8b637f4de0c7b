"""Write docs/cli.md, the command reference, from the parsers and the training configuration's metadata."""

from pathlib import Path

from bilora_dist.cli import reference_markdown

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    path.write_text(reference_markdown())
    print(f"wrote {path}")
