"""`KontextNode` specs turned into the classes ComfyUI registers: V3 (`comfy_api`) and the V1 mappings."""

from __future__ import annotations


from ._spec import Input, KontextNode

_HIDDEN_V1 = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}


def v3_class(node: type[KontextNode]) -> type:
    """A `comfy_api.v0_0_2.io.ComfyNode` subclass that runs `node`."""
    from comfy_api.v0_0_2 import io

    def define_schema(cls):
        return io.Schema(
            node_id=node.NODE_ID,
            display_name=node.DISPLAY_NAME,
            category=node.CATEGORY,
            description=node.DESCRIPTION,
            inputs=[_v3_input(io, spec) for spec in node.INPUTS],
            outputs=[_v3_type(io, out.type).Output(display_name=out.name, tooltip=out.tooltip) for out in node.OUTPUTS],
            hidden=[getattr(io.Hidden, name) for name in node.HIDDEN],
            is_output_node=node.OUTPUT_NODE,
            not_idempotent=node.NOT_IDEMPOTENT,
        )

    def execute(cls, **inputs):
        hidden = {name: getattr(cls.hidden, name, None) for name in node.HIDDEN} if cls.hidden else {}
        result = node.call(**inputs, **hidden)
        return io.NodeOutput(*result.outputs, ui=result.ui)

    attrs = {"define_schema": classmethod(define_schema), "execute": classmethod(execute), "__doc__": node.DESCRIPTION}
    if "validate_inputs" in node.__dict__:
        # passed on as is: ComfyUI reads its parameter names, and a **kwargs signature would turn off
        # its own min/max checks
        attrs["validate_inputs"] = node.__dict__["validate_inputs"]
    if "fingerprint_inputs" in node.__dict__:  # what besides the inputs decides the output (files on disk)
        attrs["fingerprint_inputs"] = node.__dict__["fingerprint_inputs"]
    return type(node.__name__, (io.ComfyNode,), attrs)


def _v3_type(io, type_name: str):
    builtin = {
        "INT": io.Int,
        "FLOAT": io.Float,
        "STRING": io.String,
        "BOOLEAN": io.Boolean,
        "COMBO": io.Combo,
        "IMAGE": io.Image,
        "MASK": io.Mask,
        "LATENT": io.Latent,
        "CONDITIONING": io.Conditioning,
    }
    return builtin.get(type_name) or io.Custom(type_name)


def _v3_input(io, spec: Input):
    common = {"tooltip": spec.tooltip, "optional": spec.optional}
    if spec.type == "COMBO":
        return io.Combo.Input(spec.name, options=spec.choices(), default=spec.default, **common)
    if spec.type in ("INT", "FLOAT"):
        extra = {"control_after_generate": True} if spec.control_after_generate else {}
        kind = io.Int if spec.type == "INT" else io.Float
        return kind.Input(
            spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step, **extra, **common
        )
    if spec.type == "STRING":
        return io.String.Input(spec.name, default=spec.default, multiline=spec.multiline, **common)
    if spec.type == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    return _v3_type(io, spec.type).Input(spec.name, **common)


def v1_class(node: type[KontextNode]) -> type:
    """The same node as a V1 class (INPUT_TYPES / RETURN_TYPES), for an import outside ComfyUI."""

    def input_types(cls):
        required, optional = {}, {}
        for spec in node.INPUTS:
            (optional if spec.optional else required)[spec.name] = v1_input(spec)
        types = {"required": required, "optional": optional}
        if node.HIDDEN:
            types["hidden"] = {name: _HIDDEN_V1[name] for name in node.HIDDEN}
        return types

    def execute(self, **inputs):
        result = node.call(**inputs)
        return {"result": result.outputs, "ui": result.ui} if result.ui is not None else result.outputs

    attrs = {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(out.type for out in node.OUTPUTS),
        "RETURN_NAMES": tuple(out.name for out in node.OUTPUTS),
        "OUTPUT_TOOLTIPS": tuple(out.tooltip for out in node.OUTPUTS),
        "FUNCTION": "execute",
        "execute": execute,
        "CATEGORY": node.CATEGORY,
        "DESCRIPTION": node.DESCRIPTION,
        "OUTPUT_NODE": node.OUTPUT_NODE,
        "NOT_IDEMPOTENT": node.NOT_IDEMPOTENT,
    }
    if "validate_inputs" in node.__dict__:
        attrs["VALIDATE_INPUTS"] = node.__dict__["validate_inputs"]
    if "fingerprint_inputs" in node.__dict__:
        attrs["IS_CHANGED"] = node.__dict__["fingerprint_inputs"]
    return type(node.__name__, (), attrs)


def v1_input(spec: Input) -> tuple:
    options = {"tooltip": spec.tooltip}
    for key in ("default", "min", "max", "step"):
        if getattr(spec, key) is not None:
            options[key] = getattr(spec, key)
    if spec.multiline:
        options["multiline"] = True
    if spec.control_after_generate:
        options["control_after_generate"] = True
    if spec.type == "COMBO":
        return (spec.choices(), options)
    return (spec.type, options)
