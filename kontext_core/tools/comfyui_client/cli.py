"""The batch client's command line."""

import argparse
import json
import sys
import time
from pathlib import Path

from kontext_core.batch.items import BatchError, add_item_options, items_from_args
from kontext_core.cli.options import positive
from kontext_core.tools.comfyui_client.fleet import FleetBatch, Member
from kontext_core.tools.comfyui_client.items import find_slots
from kontext_core.tools.comfyui_client.jobs import Runner
from kontext_core.tools.comfyui_client.transport import Server

DEFAULT_SERVER = "http://127.0.0.1:8188"
TIMES = (  # flag, default seconds, what they measure
    ("--timeout", 600.0, "one item may take"),
    ("--stall-timeout", 120.0, "without a word from a server running an item before it is taken for hung"),
    ("--http-timeout", 30.0, "one HTTP request may take"),
    ("--retry-after", 30.0, "before a server out of rotation is asked again whether it answers"),
    ("--give-up-after", 300.0, "an item waits for a server it may run on to answer again before it is failed"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kontext_core.tools.comfyui_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        help=f"a ComfyUI's address; repeat for several (one per GPU), default {DEFAULT_SERVER}",
    )
    parser.add_argument("--servers", type=Path, help="a file of ComfyUI addresses, one a line (# starts a comment)")
    parser.add_argument("--workflow", required=True, type=Path, help="API-format workflow (workflows/api/*.json)")
    add_item_options(parser, default_seed="the workflow's")
    parser.add_argument("--out", required=True, type=Path, help="folder for the results and the resume state")
    parser.add_argument("--image-node", help="id of the node whose 'image' input gets the uploaded file")
    parser.add_argument("--prompt-node", help="id of the node whose 'prompt'/'text' input gets the prompt")
    parser.add_argument("--seed-node", help="id of the node whose 'seed'/'noise_seed' input gets the seed")
    for flag, seconds, meaning in TIMES:
        parser.add_argument(flag, type=positive, default=seconds, help=f"seconds {meaning} (default {seconds:g})")
    return parser


def server_urls(listed: list[str], file: Path | None) -> list[str]:
    urls = list(listed)
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise BatchError(f"--servers: cannot read {file}: {e.strerror}") from None
        urls += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    urls = urls or [DEFAULT_SERVER]
    twice = sorted({url for url in urls if urls.count(url) > 1})
    if twice:
        raise BatchError(f"--server: {', '.join(twice)} given more than once")
    return urls


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        items = items_from_args(parser, args)
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
        slots = find_slots(workflow, args.image_node, args.prompt_node, args.seed_node)
        servers = [Server(url, timeout=args.http_timeout) for url in server_urls(args.server, args.servers)]
        answering = []
        for server in servers:
            try:
                server.check()
                answering.append(True)
            except BatchError as e:
                if len(servers) == 1:
                    raise
                print(f"warning: {e}; it joins once it answers", file=sys.stderr)
                answering.append(False)
        if not any(answering):
            raise BatchError(f"none of the {len(servers)} servers answers")
    except (BatchError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    members = []
    for server, answers in zip(servers, answering):
        runner = Runner(server, timeout=args.timeout, stall_timeout=args.stall_timeout)
        members.append(Member(runner, in_rotation=answers, retry_at=time.monotonic() + args.retry_after))
        if answers:
            runner.connect()
    log = members[0].runner.log
    batch = FleetBatch(
        members,
        workflow,
        slots,
        items,
        args.out,
        retry_after=args.retry_after,
        give_up_after=args.give_up_after,
        log=log,
    )
    try:
        totals = batch.run()
    finally:
        for member in members:
            member.runner.close()
    if len(members) > 1:
        for member in members:
            state = "in rotation" if member.in_rotation else "out of rotation"
            log(f"server {member.name}: {member.done} done, {member.failed} failed attempts, {state} at the end")
    log(f"{totals.done} done, {totals.skipped} already done, {totals.failed} failed; results in {args.out}")
    return 1 if totals.failed else 0


if __name__ == "__main__":
    sys.exit(main())
