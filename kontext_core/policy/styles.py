"""Style presets: one wording per style for editing (an instruction) and one for generating (a description)."""

from __future__ import annotations

# Edit wording is an instruction Kontext can follow on an existing image; it names what must stay.
STYLE_PRESETS: dict[str, str] = {
    "3d-model": "Restyle the image as a polished 3D render with soft studio lighting and clean shaded surfaces, "
    "while keeping the composition and subjects unchanged.",
    "analog-film": "Restyle the image as an analog film photograph with natural grain, gentle halation and faded, "
    "warm colours, while keeping the composition and subjects unchanged.",
    "anime": "Restyle the image as an anime illustration with clean line work, cel shading and vivid colours, "
    "while keeping the composition and subjects unchanged.",
    "cinematic": "Restyle the image as a cinematic film still with dramatic lighting, anamorphic depth of field "
    "and a graded colour palette, while keeping the composition and subjects unchanged.",
    "comic-book": "Restyle the image as a comic book panel with bold ink outlines, halftone shading and flat "
    "saturated colours, while keeping the composition and subjects unchanged.",
    "craft-clay": "Restyle the image as a handmade clay sculpture scene with visible fingerprints and a "
    "stop-motion look, while keeping the composition and subjects unchanged.",
    "digital-art": "Restyle the image as a detailed digital painting with smooth brushwork and rich lighting, "
    "while keeping the composition and subjects unchanged.",
    "enhance": "Enhance the image: sharpen fine detail, clean up noise and balance exposure and colour, "
    "while keeping the composition, subjects and style unchanged.",
    "fantasy-art": "Restyle the image as an epic fantasy painting with luminous atmosphere and painterly detail, "
    "while keeping the composition and subjects unchanged.",
    "isometric": "Restyle the image as an isometric illustration with a clean orthographic viewpoint and crisp "
    "geometric shapes, while keeping the subjects and their arrangement unchanged.",
    "line-art": "Restyle the image as black ink line art on a white background with confident contours and no "
    "shading, while keeping the composition and subjects unchanged.",
    "low-poly": "Restyle the image as low-poly 3D art built from flat-shaded triangular facets, "
    "while keeping the composition and subjects unchanged.",
    "neon-punk": "Restyle the image in a neon cyberpunk look with glowing magenta and cyan lights against deep "
    "shadows, while keeping the composition and subjects unchanged.",
    "origami": "Restyle the image as folded paper origami with crisp creases and paper texture, "
    "while keeping the composition and subjects unchanged.",
    "photographic": "Restyle the image as a natural, high-resolution photograph with realistic lighting and "
    "lens depth of field, while keeping the composition and subjects unchanged.",
    "pixel-art": "Restyle the image as retro pixel art with a limited palette and hard square pixels, "
    "while keeping the composition and subjects unchanged.",
    "texture": "Restyle the image as a seamless close-up material texture with rich surface detail, "
    "while keeping the colours and overall layout unchanged.",
}

# Generate wording describes the picture; "{prompt}" is where the user's subject goes.
_GENERATE: dict[str, str] = {
    "3d-model": "A polished 3D render of {prompt}, soft studio lighting, clean shaded surfaces.",
    "analog-film": "An analog film photograph of {prompt}, natural grain, gentle halation, faded warm colours.",
    "anime": "An anime illustration of {prompt}, clean line work, cel shading, vivid colours.",
    "cinematic": "A cinematic film still of {prompt}, dramatic lighting, shallow depth of field, colour graded.",
    "comic-book": "A comic book panel of {prompt}, bold ink outlines, halftone shading, flat saturated colours.",
    "craft-clay": "A handmade clay sculpture of {prompt}, visible fingerprints, stop-motion look.",
    "digital-art": "A detailed digital painting of {prompt}, smooth brushwork, rich lighting.",
    "enhance": "A sharp, well-exposed, highly detailed image of {prompt}, balanced colour.",
    "fantasy-art": "An epic fantasy painting of {prompt}, luminous atmosphere, painterly detail.",
    "isometric": "An isometric illustration of {prompt}, orthographic viewpoint, crisp geometric shapes.",
    "line-art": "Black ink line art of {prompt} on a white background, confident contours, no shading.",
    "low-poly": "Low-poly 3D art of {prompt}, flat-shaded triangular facets.",
    "neon-punk": "{prompt} in a neon cyberpunk look, glowing magenta and cyan lights, deep shadows.",
    "origami": "Folded paper origami of {prompt}, crisp creases, paper texture.",
    "photographic": "A natural high-resolution photograph of {prompt}, realistic lighting, lens depth of field.",
    "pixel-art": "Retro pixel art of {prompt}, limited palette, hard square pixels.",
    "texture": "A seamless close-up material texture of {prompt}, rich surface detail.",
}

STYLE_MODES = ("edit", "generate")


def apply_style(prompt: str, name: str, mode: str = "edit") -> str:
    """`prompt` with the wording of style `name`: appended as an instruction ("edit") or wrapped as a description."""
    if name not in STYLE_PRESETS:
        raise ValueError(f"style must be one of {sorted(STYLE_PRESETS)}, got {name!r}")
    if mode not in STYLE_MODES:
        raise ValueError(f"mode must be one of {STYLE_MODES}, got {mode!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    prompt = prompt.strip()
    if mode == "generate":
        if not prompt:
            raise ValueError("prompt must describe a subject in generate mode, got an empty prompt")
        text = _GENERATE[name].replace("{prompt}", prompt.rstrip(".!? "))
        return text[0].upper() + text[1:]
    if not prompt:
        return STYLE_PRESETS[name]
    if prompt[-1] not in ".!?":
        prompt += "."
    return f"{prompt} {STYLE_PRESETS[name]}"
