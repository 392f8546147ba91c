"""AI-disclosure metadata and C2PA signing for saved PNGs.

`save_png` writes atomically: PNG text chunks (ComfyUI's `prompt`/`workflow`, `parameters`, `ai_generated`),
XMP with IPTC's digital source type and EXIF Software/ImageDescription first, then — when a certificate
chain and key are configured — a C2PA manifest signed offline (no timestamp authority, no network).
The signature comes last because it hashes every byte before it.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from PIL import Image, PngImagePlugin

from kontext_core import __version__
from kontext_core.files import written_whole
from kontext_core.policy import INSTALL_HINT

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
DEFAULT_MODEL = "FLUX.1 Kontext [dev]"
SOFTWARE = "comfyui-kontext"
# The text chunks save_png writes itself; `extra_text` may not repeat them.
_TOOL_TEXT_KEYS = ("prompt", "workflow", "parameters", "ai_generated", "model")  # ComfyUI's, A1111's, ours
_STANDARD_TEXT_KEYS = ("Software", "Description", "DigitalSourceType", "XML:com.adobe.xmp")  # PNG, IPTC, XMP
RESERVED_TEXT_KEYS = _TOOL_TEXT_KEYS + _STANDARD_TEXT_KEYS
CERT_ENV, KEY_ENV = "KONTEXT_C2PA_CERT_CHAIN", "KONTEXT_C2PA_PRIVATE_KEY"

_EXIF_IMAGE_DESCRIPTION, _EXIF_SOFTWARE = 0x010E, 0x0131
# Nothing here may reach the network: no remote manifests, no OCSP; trust is decided by the anchors we pass.
_OFFLINE_VERIFY = {"remote_manifest_fetch": False, "ocsp_fetch": False}


class ProvenanceError(RuntimeError):
    """Signing was requested but cannot be done (missing package, unreadable or rejected certificate)."""


@dataclass(frozen=True)
class SigningConfig:
    cert_chain: Path  # PEM, leaf first, then intermediates (the root may follow; C2PA ignores it)
    private_key: Path  # PEM (PKCS#8) EC P-256 key of the leaf, for ES256

    @classmethod
    def from_env(cls) -> SigningConfig | None:
        """The configuration from KONTEXT_C2PA_CERT_CHAIN / KONTEXT_C2PA_PRIVATE_KEY, or None when unset."""
        cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
        if not cert and not key:
            return None
        if not (cert and key):
            raise ProvenanceError(f"set both {CERT_ENV} and {KEY_ENV} to sign, or neither")
        return cls(Path(cert), Path(key))


@dataclass(frozen=True)
class TestCertificates:
    root_cert: Path
    cert_chain: Path
    private_key: Path

    def signing_config(self) -> SigningConfig:
        return SigningConfig(self.cert_chain, self.private_key)


def model_name(file_name: str, *, builtin: bool = False) -> str:
    """How saved images name the model that made them: the transformer file (a path's last part), or the
    built-in small model."""
    name = os.path.basename(file_name)
    return f"Kontext Core's built-in small model ({name})" if builtin else f"FLUX.1 Kontext ({name})"


def with_loras(model: str, loras: list[tuple[str, float | None]]) -> str:
    """`model` (a `model_name`) with the LoRAs put on it: each file's last part and its strength (None: not known
    where the name is written, e.g. linked from another node in a graph)."""
    shown = sorted(
        f"{os.path.basename(name)} ({'strength from a linked node' if s is None else f'{s:g}'})" for name, s in loras
    )
    return model + (f" with LoRA {', '.join(shown)}" if shown else "")


def save_png(
    image: Image.Image,
    path: str | os.PathLike,
    *,
    prompt: str | Mapping | None = None,
    workflow: str | Mapping | None = None,
    instruction: str | None = None,
    parameters: str | None = None,
    model: str = DEFAULT_MODEL,
    inputs: Sequence[Image.Image | str | os.PathLike] = (),
    signing: SigningConfig | None = None,
    extra_text: Mapping[str, str] | None = None,
) -> Path:
    """Save `image` as a PNG that discloses it was AI-generated and, with `signing`, carries a C2PA manifest.

    `prompt`/`workflow` are ComfyUI's API prompt and UI workflow (dicts or JSON strings). `instruction` is the
    user's text prompt, `parameters` a one-line summary (seed, steps, ...). `inputs` are the edited images:
    none means text-to-image (`c2pa.created`), otherwise `c2pa.opened` + `c2pa.edited` with the first input as
    parent ingredient and the rest as components. The file appears at `path` complete or not at all.
    """
    path = Path(path)
    description = f"AI-generated with {model}" + (f": {instruction}" if instruction else "")
    info = PngImagePlugin.PngInfo()
    for key, value in (("prompt", prompt), ("workflow", workflow)):
        if value is not None:
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("parameters", parameters or description)
    info.add_text("ai_generated", "true")
    info.add_text("model", model)
    info.add_text("Software", SOFTWARE)
    info.add_text("Description", description)
    info.add_text("DigitalSourceType", TRAINED_ALGORITHMIC_MEDIA)
    for key, value in (extra_text or {}).items():
        # a reader keeps the last value of a repeated key: extra text must not rewrite the disclosure
        if key in RESERVED_TEXT_KEYS:
            raise ValueError(f"extra_text key {key!r} is written by save_png itself (reserved: {RESERVED_TEXT_KEYS})")
        info.add_text(key, value)
    info.add_itxt("XML:com.adobe.xmp", _xmp(description, model, bool(inputs)))
    exif = Image.Exif()
    exif[_EXIF_SOFTWARE] = f"{SOFTWARE} ({model})"
    exif[_EXIF_IMAGE_DESCRIPTION] = description

    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as partial:
        if signing is None:
            image.save(partial, format="PNG", pnginfo=info, exif=exif)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                unsigned = Path(scratch) / "unsigned.png"
                image.save(unsigned, format="PNG", pnginfo=info, exif=exif)
                _sign(str(unsigned), str(partial), signing, model=model, title=path.name, inputs=inputs)
    return path


def verify_png(path: str | os.PathLike, trust_anchor_pem: str | os.PathLike | None = None) -> dict[str, Any]:
    """Validate the C2PA manifest of a file offline.

    Returns `validation_state` ("Valid": signature and hashes check out; "Trusted": also chains to
    `trust_anchor_pem`, a PEM path or PEM text; "Invalid"; None when the file has no manifest),
    `failures` (the failure codes), `active_manifest` and `manifest_store` (c2pa's JSON, parsed).
    """
    c2pa = _import_c2pa()
    settings: dict[str, Any] = {"verify": {**_OFFLINE_VERIFY, "verify_trust": trust_anchor_pem is not None}}
    if trust_anchor_pem is not None:
        text = str(trust_anchor_pem)
        pem = text if "-----BEGIN" in text else Path(text).read_text()
        settings["trust"] = {"trust_anchors": pem}
    try:
        context = c2pa.Context.from_dict(settings)
    except c2pa.C2paError as e:
        raise ProvenanceError(
            f"{trust_anchor_pem}: the trust anchors are not PEM certificates c2pa can use ({e})"
        ) from None
    with open(path, "rb") as f:
        try:
            reader = c2pa.Reader.try_create("image/png", f, None, context)
            if reader is None:
                return {"validation_state": None, "failures": [], "active_manifest": None, "manifest_store": None}
            with reader:
                store = json.loads(reader.json())
        except c2pa.C2paError as e:
            raise ProvenanceError(f"{path}: cannot be read as a PNG with a C2PA manifest ({e})") from None
    active = store.get("manifests", {}).get(store.get("active_manifest"))
    failures = [item["code"] for item in store.get("validation_status") or []]
    for section in (store.get("validation_results") or {}).values():
        if isinstance(section, dict):
            failures += [item["code"] for item in section.get("failure", [])]
    return {
        "validation_state": store.get("validation_state"),
        "failures": sorted(set(failures)),
        "active_manifest": active,
        "manifest_store": store,
    }


def make_test_certificates(out_dir: str | os.PathLike, *, days: int = 365) -> TestCertificates:
    """A throwaway root CA and an ES256 signing certificate it issued, for tests and local trials only.

    C2PA rejects self-signed signing certificates, so the leaf is issued by a separate root and carries
    the extensions C2PA's certificate profile asks for: digitalSignature key usage, the emailProtection
    EKU, subject/authority key identifiers and CA:false.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "comfyui-kontext test"),
            ]
        )

    def key_usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
        # every usage off but signing (the leaf) or certificate and CRL signing (the CA)
        unused = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
        off = dict.fromkeys((*unused, "encipher_only", "decipher_only"), False)
        return x509.KeyUsage(digital_signature=sign, key_cert_sign=ca, crl_sign=ca, **off)

    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    start = now - datetime.timedelta(minutes=5)
    root = (
        x509.CertificateBuilder()
        .subject_name(name("comfyui-kontext test root CA"))
        .issuer_name(name("comfyui-kontext test root CA"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=days + 1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(sign=False, ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name("comfyui-kontext test signer"))
        .issuer_name(root.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(sign=True, ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    certs = TestCertificates(out / "root_ca.pem", out / "signer_chain.pem", out / "signer_key.pem")
    certs.root_cert.write_bytes(pem(root))
    certs.cert_chain.write_bytes(pem(leaf) + pem(root))
    key_bytes = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(certs.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    return certs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kontext_core.policy.provenance", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ca = commands.add_parser("make-test-ca", help="write a throwaway root CA + ES256 signing certificate (tests only)")
    ca.add_argument("out_dir")
    verify = commands.add_parser("verify", help="validate a PNG's C2PA manifest offline")
    verify.add_argument("path")
    verify.add_argument("--trust", help="PEM file of trust anchors (e.g. the test root CA)")
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except (OSError, ProvenanceError) as e:  # a missing or unreadable file, an existing CA folder: its message
        print(f"python -m kontext_core.policy.provenance {args.command}: error: {e}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    if args.command == "make-test-ca":
        certs = make_test_certificates(args.out_dir)
        print(
            f"root CA (trust anchor): {certs.root_cert}\nsigning chain: {certs.cert_chain}\n"
            f"private key: {certs.private_key}\n"
            f"sign with: {CERT_ENV}={certs.cert_chain} {KEY_ENV}={certs.private_key}"
        )
        return 0
    result = verify_png(args.path, args.trust)
    print(json.dumps({"validation_state": result["validation_state"], "failures": result["failures"]}, indent=2))
    if result["manifest_store"] is None:
        print(f"{args.path}: no C2PA manifest (not signed)", file=sys.stderr)
    # with trust anchors given, "Valid" means intact but signed by someone else: not a pass
    accepted = ("Trusted",) if args.trust else ("Valid", "Trusted")
    return 0 if result["validation_state"] in accepted else 1


def _xmp(description: str, model: str, edited: bool) -> str:
    action = "edited" if edited else "created"
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        ' xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"'
        ' xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/">'
        f"<Iptc4xmpExt:DigitalSourceType>{TRAINED_ALGORITHMIC_MEDIA}</Iptc4xmpExt:DigitalSourceType>"
        f"<xmp:CreatorTool>{escape(f'{SOFTWARE} ({model})')}</xmp:CreatorTool>"
        f"<photoshop:Credit>{escape(f'AI-{action} with {model}')}</photoshop:Credit>"
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{escape(description)}</rdf:li></rdf:Alt>'
        "</dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    )


def _import_c2pa() -> Any:
    try:
        import c2pa
    except ImportError as exc:
        raise ProvenanceError(
            f"C2PA signing and verification need c2pa-python ({exc}). Install: {INSTALL_HINT}"
        ) from exc
    return c2pa


def _sign(
    source: str,
    dest: str,
    signing: SigningConfig,
    *,
    model: str,
    title: str,
    inputs: Sequence[Image.Image | str | os.PathLike],
) -> None:
    c2pa = _import_c2pa()
    try:
        chain, key = Path(signing.cert_chain).read_bytes(), Path(signing.private_key).read_bytes()
    except OSError as exc:
        raise ProvenanceError(f"cannot read the C2PA certificate chain or key: {exc}") from exc
    agent = {"name": model}
    source_type = {"digitalSourceType": TRAINED_ALGORITHMIC_MEDIA, "softwareAgent": agent}
    if inputs:
        labels = [f"input_{i}" for i in range(len(inputs))]
        actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": labels[:1]}}]
        actions += [{"action": "c2pa.placed", "parameters": {"ingredientIds": [label]}} for label in labels[1:]]
        actions.append({"action": "c2pa.edited", **source_type, "parameters": {"ingredientIds": labels}})
    else:
        actions = [{"action": "c2pa.created", **source_type}]
    manifest = {
        "claim_generator_info": [{"name": SOFTWARE, "version": __version__}],
        "title": title,
        "format": "image/png",
        "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}}],
    }
    # Timestamp-less (offline) signing: the manifest is valid while the signing certificate is.
    context = c2pa.Context.from_dict({"verify": {**_OFFLINE_VERIFY, "verify_trust": False}})
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key, None))
        with c2pa.Builder(manifest, context) as builder:
            for i, item in enumerate(inputs):
                fmt, data = _ingredient_bytes(item)
                relationship = "parentOf" if i == 0 else "componentOf"
                builder.add_ingredient(
                    {"title": _ingredient_title(item, i), "relationship": relationship, "label": f"input_{i}"},
                    fmt,
                    io.BytesIO(data),
                )
            with open(source, "rb") as src, open(dest, "w+b") as dst:
                builder.sign(signer, "image/png", src, dst)
    except c2pa.C2paError as exc:
        raise ProvenanceError(f"C2PA signing failed: {exc}") from exc


def _ingredient_bytes(item: Image.Image | str | os.PathLike) -> tuple[str, bytes]:
    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return "image/png", buffer.getvalue()
    path = Path(item)
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(path.suffix.lower(), "image/png")
    return mime, path.read_bytes()


def _ingredient_title(item: Image.Image | str | os.PathLike, index: int) -> str:
    return Path(item).name if not isinstance(item, Image.Image) else f"input_{index}.png"


if __name__ == "__main__":
    sys.exit(main())
