"""`kontext fetch`: download FLUX.1 Kontext [dev] and its text encoders into a ComfyUI models folder."""

from __future__ import annotations

import argparse
import os
import sys

from kontext_core.tools import fetch as downloader
from kontext_core.tools.fetch import LICENSE_HINT, T5_FILES, UNREACHABLE, FetchError


def add_fetch_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `fetch` command to the `python -m kontext_core` subparsers."""
    p = subparsers.add_parser(
        "fetch",
        help="download FLUX.1 Kontext [dev] and its text encoders into a ComfyUI models folder",
        description="Download FLUX.1 Kontext [dev] (transformer, VAE) and ComfyUI's CLIP-L and T5-XXL into "
        "<ComfyUI>/models through the Hugging Face cache, each checked against its published sha256. " + LICENSE_HINT,
    )
    p.add_argument("--comfyui", metavar="DIR", help="the ComfyUI folder whose models/ to fill; default $COMFYUI_ROOT")
    p.add_argument("--t5", choices=list(T5_FILES), default="fp16", help="T5-XXL precision (fp8_scaled: half the size)")
    p.add_argument("--token", help="Hugging Face token; default HF_TOKEN or the one saved by `hf auth login`")
    p.add_argument("--dry-run", action="store_true", help="check access and list what would be fetched; write nothing")
    return p


def _size(n: int | None) -> str:
    return f"{n / 1e9:.2f} GB" if n is not None else "size unknown"


def run_fetch(args: argparse.Namespace) -> int:
    """The `fetch` command: 0 when every file is in place (a dry run: could be), 1 on a fetch error (a dry run: when
    offline and a file is not in the cache), 2 without a ComfyUI folder."""
    root = args.comfyui or os.environ.get("COMFYUI_ROOT")
    if not root:
        print("error: fetch needs a ComfyUI folder: pass --comfyui DIR or set COMFYUI_ROOT.", file=sys.stderr)
        return 2
    try:
        results = downloader.fetch(root, t5=args.t5, token=args.token, dry_run=args.dry_run)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in results:
        note = "" if r.verified or r.action in ("would fetch", UNREACHABLE) else " (sha256 not verified)"
        print(f"{r.action:>12}  {r.destination}  [{_size(r.size)}]{note}")
    pending = [r for r in results if r.action == "would fetch"]
    if pending:
        total = None if any(r.size is None for r in pending) else sum(r.size for r in pending)
        print(f"dry run: {len(pending)} file(s) to fetch, {_size(total)} in all.")
    unreachable = [r.file.label for r in results if r.action == UNREACHABLE]
    if unreachable:
        print(
            f"error: {', '.join(unreachable)}: not in the Hugging Face cache, and offline: fetching would fail",
            file=sys.stderr,
        )
        return 1
    return 0
