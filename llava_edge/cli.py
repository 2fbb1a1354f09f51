"""The `llava-edge` command: parse, call, print. Heavy imports happen inside the commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.command()
def info(
    ckpt: str = typer.Argument(..., help="checkpoint dir or name (llava-hf or liuhaotian layout)"),
    vision_tower: Optional[str] = typer.Option(None, help="CLIP vision dir for liuhaotian checkpoints"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Format, dimensions, image size, image tokens, parameter counts and vocab of a checkpoint."""
    from .reference.info import checkpoint_info, format_info

    summary = checkpoint_info(ckpt, vision_tower)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_info(summary))


@app.command()
def chat(
    image: Path = typer.Argument(..., help="an image file"),
    bundle: Optional[Path] = typer.Option(None, help="edge bundle dir (default: the demo bundle)"),
    prompt: Optional[str] = typer.Option(None, help="one question; without it, interactive chat"),
):
    """Chat about an image with an edge bundle."""
    demo = Path(__file__).parent / "assets" / "demo" / "bundle"
    bundle_dir = bundle or demo
    if not (bundle_dir / "manifest.json").exists():
        raise UserError(
            f"no edge bundle at {bundle_dir}"
            + (" (the demo bundle is not shipped yet; export one with `llava-edge export`)" if bundle is None else "")
        )
    raise UserError("the edge runtime is not part of this release yet")


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"llava-edge: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
