"""What the pack allows and records: the safety filter (prompts and images), provenance, style presets."""

# the extra that installs the image classifier and C2PA signing (one extra for both)
INSTALL_HINT = 'pip install "comfyui-kontext[safety]"'
