"""The batch client's command line."""

import argparse
import json
import sys
from pathlib import Path

from kontext_core.tools.comfyui_client.items import QueueError, find_slots, items_from_csv, items_from_folder
from kontext_core.tools.comfyui_client.jobs import Runner, run_batch
from kontext_core.tools.comfyui_client.transport import Server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kontext_core.tools.comfyui_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address")
    parser.add_argument("--workflow", required=True, type=Path, help="API-format workflow (workflows/api/*.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images, each run with --prompt")
    source.add_argument("--csv", type=Path, help="CSV with columns image,prompt,seed (seed may be empty)")
    parser.add_argument("--prompt", help="the instruction for every image of --images")
    parser.add_argument("--seed", type=int, help="seed for every image of --images (default: the workflow's)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the results and the resume state")
    parser.add_argument("--image-node", help="id of the node whose 'image' input gets the uploaded file")
    parser.add_argument("--prompt-node", help="id of the node whose 'prompt'/'text' input gets the prompt")
    parser.add_argument("--seed-node", help="id of the node whose 'seed'/'noise_seed' input gets the seed")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one item may take (default 600)")
    parser.add_argument("--http-timeout", type=float, default=30.0, help="seconds one HTTP request may take")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images is not None and args.prompt is None:
        parser.error("--images needs --prompt")
    if args.csv is not None and (args.prompt is not None or args.seed is not None):
        parser.error("--prompt and --seed go with --images; a CSV carries them per row")
    if args.timeout <= 0 or args.http_timeout <= 0:
        parser.error("--timeout and --http-timeout must be positive")
    try:
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
        slots = find_slots(workflow, args.image_node, args.prompt_node, args.seed_node)
        if args.images is not None:
            items = items_from_folder(args.images, args.prompt, args.seed)
        else:
            items = items_from_csv(args.csv)
        server = Server(args.server, timeout=args.http_timeout)
        server.check()
    except (QueueError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runner = Runner(server, timeout=args.timeout)
    runner.connect()
    try:
        done, skipped, failed = run_batch(runner, workflow, slots, items, args.out)
    finally:
        runner.close()
    runner.log(f"{done} done, {skipped} already done, {failed} failed; results in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
