"""Batches of edits with the library: `python -m kontext_core.batch --csv items.csv --out DIR [--ray [ADDRESS]]`.

In-process by default; with `--ray`, one `KontextPipeline` per Ray actor (one GPU each on GPU machines), on a local
Ray instance or, with an address, a cluster. Every output is written whole and recorded in `DIR/manifest.jsonl`
(`manifest`), which makes a rerun resume. The items (`items`) and the manifest are shared with the ComfyUI client,
so this package's top level imports nothing beyond the standard library.
"""
