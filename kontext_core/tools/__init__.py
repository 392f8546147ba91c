"""Clients of the engine, not parts of it: model-file discovery, the downloader, the ComfyUI batch client."""
