"""The `kontext` command (also `python -m kontext_core`): runs demo, edit, generate, inspect and fetch, and hands
the other subcommands (queue, provenance, train-flux, train-vae, store-fp8) to their own command lines."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from kontext_core.cli.errors import in_flags
from kontext_core.cli.models import add_loras, load_pipeline, wants_small_model
from kontext_core.cli import parallel
from kontext_core.cli.outputs import made_by, output_paths, progress_bar, refuse_bad_out, save_image
from kontext_core.cli.parser import DELEGATED, build_parser
from kontext_core.parallel.errors import ParallelError
from kontext_core.policy.provenance import ProvenanceError
from kontext_core.policy.safety import SafetyUnavailableError
from kontext_core.synthetic.tasks import make_task

EXIT_BLOCKED = 3  # the safety checks refused the prompt, an input image or an output: not a usage error (2)


class SafetyBlocked(Exception):
    """An input or output the safety checks refused."""


def run_demo(args: argparse.Namespace) -> int:
    """One held-out task: the small model's edit beside the input and the rendered truth, judged."""
    from kontext_core.policy.provenance import model_name
    from kontext_core.synthetic.judge import judge
    from kontext_core.small_model import load_default_pipeline, small_model_files

    refuse_bad_out(args.out, folder=True)
    task = make_task(args.seed, args.kind)
    pipe = load_default_pipeline()
    print(f"task {task.kind} (seed {task.seed}): {task.instruction}", file=sys.stderr)
    settings = {"steps": args.steps, "seed": 0, "guidance": 2.5}  # the noise seed; --seed picks the task
    progress = progress_bar(task.kind)
    if task.kind == "text_to_image":
        after = pipe.generate(
            task.instruction, width=task.target.width, height=task.target.height, callback=progress, **settings
        )
    else:
        after = pipe.edit(task.images, task.instruction, callback=progress, **settings)
    out = Path(args.out)
    befores = [f"before{'' if i == 0 else f'_{i + 1}'}.png" for i in range(len(task.images))]
    for name, image in (*zip(befores, task.images), ("truth.png", task.target)):
        save_image(image, out / name)
    model = model_name(small_model_files().transformer.name, builtin=True)
    save_image(after, out / "after.png", made_by(model, task.instruction, task.images, **settings))
    verdict = judge(task, after)
    unedited = "" if verdict.psnr_unedited is None else f", unedited pixels {verdict.psnr_unedited:.1f} dB"
    print(f"{'success' if verdict.success else 'FAILED'}: PSNR to the truth {verdict.psnr_target:.1f} dB{unedited}")
    print(f"wrote {', '.join(str(out / n) for n in (*befores, 'after.png', 'truth.png'))}")
    return 0 if verdict.success else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return module.main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except SafetyBlocked as e:
        print(f"kontext {args.command}: blocked by the safety checks: {e}", file=sys.stderr)
        return EXIT_BLOCKED
    except SafetyUnavailableError as e:
        if args.traceback:
            raise
        print(
            f"kontext {args.command}: error: {e} (or pass --no-safety-check, and review the outputs yourself)",
            file=sys.stderr,
        )
        return 2
    except (FileNotFoundError, ValueError, ProvenanceError) as e:  # ValueError includes CheckpointError
        # a missing file or a bad input (a seed, a size, a file of the wrong kind): its message, not a traceback,
        # unless asked for, since a genuine bug raising ValueError would look the same
        if args.traceback:
            raise
        print(f"kontext {args.command}: error: {in_flags(str(e))}", file=sys.stderr)
        return 2
    except ParallelError as e:  # stopped by another rank, whose own error is printed by that rank
        print(f"kontext {args.command}: {e}", file=sys.stderr)
        return 1
    finally:
        parallel.stop()


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        if args.plan:
            from kontext_core.cli.plan import run_plan

            return run_plan(args)
        if args.path is None:
            raise ValueError("inspect needs a model file (or --plan)")
        if args.vram is not None:
            raise ValueError("--vram needs --plan (it sizes the memory plan)")
        from kontext_core.checkpoints.summary import describe

        print(describe(args.path))
        return 0
    if args.command == "demo":
        return run_demo(args)
    if args.command == "fetch":
        from kontext_core.cli.fetch import run_fetch

        return run_fetch(args)

    from PIL import Image

    from kontext_core.policy import safety

    refuse_bad_out(args.out)
    plan = parallel.start(args)  # None without --parallel; outside torchrun the flag is refused here
    for path, _ in args.lora:
        if not Path(path).is_file():
            raise ValueError(f"--lora {path}: no such file")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and value % 16:
            print(f"note: --{name} {value} is not a multiple of 16 and is rounded down", file=sys.stderr)
    if not args.no_safety_check:  # before anything loads: a refused prompt costs nothing
        _refuse_if_blocked(safety.check_prompt(args.prompt, args.safety_tolerance), "--prompt")
    checked = not args.no_safety_check and _image_classifier_ready(safety)
    images = []
    for path in args.image if args.command == "edit" else []:
        try:
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--image {path}: cannot be read as an image ({e})") from None
        if checked:
            _refuse_if_blocked(safety.check_image(images[-1], args.safety_tolerance), f"--image {path}")
    small = wants_small_model(args)
    pipe, model = load_pipeline(args, small)
    model = add_loras(pipe, args.lora, model)
    parallel.split_transformer(pipe, plan)
    sampling = ("steps", "guidance", "seed", "negative_prompt", "true_cfg_scale", "num_images")
    callback = parallel.step_callback(plan, progress_bar(args.command))
    common = {name: getattr(args, name) for name in sampling} | {"callback": callback}
    if args.command == "edit":
        result = pipe.edit(
            images,
            args.prompt,
            width=args.width,
            height=args.height,
            resize=args.resize,
            reference_method=args.reference_method,
            reference_cache_every=args.fast,
            **common,
        )
    else:
        size = 64 if small else 1024
        width, height = (size if args.width is None else args.width), (size if args.height is None else args.height)
        result = pipe.generate(args.prompt, width=width, height=height, **common)
    if plan is not None and not plan.is_writer:
        return 0
    results = result if isinstance(result, list) else [result]
    record = made_by(model, args.prompt, images, steps=args.steps, seed=args.seed, guidance=args.guidance)
    withheld = []
    for image, path in zip(results, output_paths(args.out, len(results))):
        refusal = None
        if checked:
            try:
                verdict = safety.check_image(image, args.safety_tolerance)
                refusal = verdict.reason if verdict.blocked else None
            except SafetyUnavailableError as e:  # this result unchecked: the others are still checked and written
                refusal = f"it could not be checked ({e})"
        if refusal is not None:
            earlier = " (the file there from before is left as it was)" if path.exists() else ""
            withheld.append(f"{path} not written{earlier}, {refusal}")
            continue
        print(save_image(image, path, record))
    if withheld:
        raise SafetyBlocked("; ".join(withheld))
    return 0


def _image_classifier_ready(safety) -> bool:
    """Whether the images will be checked. The core install has no classifier: the command says so and goes on
    with the prompt checked only. An installed one that cannot load stops the command here, before sampling."""
    if not safety.image_classifier_installed():
        print(
            f"note: the images are not checked for nudity: the image classifier is not installed "
            f"({safety.INSTALL_HINT})",
            file=sys.stderr,
        )
        return False
    safety.require_image_classifier()
    return True


def _refuse_if_blocked(verdict, what: str) -> None:
    if verdict.blocked:
        raise SafetyBlocked(f"{what} {verdict.reason}")


if __name__ == "__main__":
    sys.exit(main())
