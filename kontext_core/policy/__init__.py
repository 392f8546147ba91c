"""What the pack allows and records: the safety filter (prompts and images), provenance, style presets."""
