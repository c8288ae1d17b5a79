"""A catalogue of bad expert bundles: each is refused by the one gate, never half-used.

Every case starts from a valid bundle (the ``expert_factory`` fixture), corrupts a copy in one
way, and checks that :func:`flexfed.common.formats.bundle.validate_bundle` raises exactly the
error class of that defect with a message that names it, and that assembling with the bad
bundle fails without leaving anything at (or next to) the output path. Defects the
safetensors library cannot produce are written by hand (``struct`` + ``json``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from flexfed.common.errors import (
    AnchorMismatchError,
    BundleError,
    FlexfedError,
    MetadataError,
    MissingFileError,
    NonFiniteTensorError,
    SafetensorsFormatError,
    TensorMismatchError,
)
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import (
    EXPERT_META,
    EXPERT_WEIGHTS,
    MAX_ATTESTATION_BYTES,
    MAX_META_BYTES,
    PROVENANCE,
    SIGNATURE,
    max_weights_bytes,
    validate_bundle,
)
from flexfed.common.formats.safetensors_io import load_tensors, save_tensors, tensor_bytes
from flexfed.common.moe.assembly import assemble

Corruption = Callable[[Path, Anchor], None]
OTHER_FAMILY = {"olmo2": "llama", "llama": "olmo2"}


# --- raw safetensors bytes -------------------------------------------------------------------


def split_weights(bundle: Path) -> tuple[dict[str, Any], bytes]:
    """The header (as a dict) and the data section of a bundle's expert.safetensors."""
    raw = (bundle / EXPERT_WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def raw_file(header: dict[str, Any] | str | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file byte by byte; ``length`` overrides the header-length field."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def raw_tensors(tensors: dict[str, tuple[str, torch.Tensor]]) -> bytes:
    """A well-formed file of (dtype name, tensor) entries, for dtypes our writer refuses."""
    header: dict[str, Any] = {}
    data = b""
    for name, (dtype, t) in tensors.items():
        blob = tensor_bytes(t)
        header[name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(blob)],
        }
        data += blob
    return raw_file(header, data)


def last_tensor(header: dict[str, Any]) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


# --- corruptions -----------------------------------------------------------------------------


def edit_header(edit: Callable[[dict[str, Any], bytes], bytes]) -> Corruption:
    """Rewrite expert.safetensors from its parsed header and data section."""

    def corrupt(bundle: Path, anchor: Anchor) -> None:
        header, data = split_weights(bundle)
        (bundle / EXPERT_WEIGHTS).write_bytes(edit(header, data))

    return corrupt


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], object]) -> Corruption:
    """Load the expert's tensors, change them, and save them with our (valid) writer."""

    def corrupt(bundle: Path, anchor: Anchor) -> None:
        tensors = load_tensors(bundle / EXPERT_WEIGHTS)
        edit(tensors)
        save_tensors(bundle / EXPERT_WEIGHTS, tensors, {"format": "pt"})

    return corrupt


def edit_meta(edit: Callable[[dict[str, Any], Anchor], object]) -> Corruption:
    """Change expert.json as a document and write it back as JSON."""

    def corrupt(bundle: Path, anchor: Anchor) -> None:
        doc = json.loads((bundle / EXPERT_META).read_text())
        edit(doc, anchor)
        (bundle / EXPERT_META).write_text(json.dumps(doc))

    return corrupt


def write_meta_text(text: Callable[[str], str]) -> Corruption:
    """Replace expert.json with text derived from the valid file's text."""

    def corrupt(bundle: Path, anchor: Anchor) -> None:
        path = bundle / EXPERT_META
        path.write_text(text(path.read_text()))

    return corrupt


def truncate_weights(bundle: Path, anchor: Anchor) -> None:
    path = bundle / EXPERT_WEIGHTS
    path.write_bytes(path.read_bytes()[:-10])


def truncate_header(bundle: Path, anchor: Anchor) -> None:
    path = bundle / EXPERT_WEIGHTS
    path.write_bytes(path.read_bytes()[:40])


def empty_weights(bundle: Path, anchor: Anchor) -> None:
    (bundle / EXPERT_WEIGHTS).write_bytes(b"")


def duplicate_key(header: dict[str, Any], data: bytes) -> bytes:
    # The same tensor twice: Python's json would silently keep the second entry.
    key = "layers.0.router.bias"
    text = json.dumps(header)
    return raw_file(f'{text[:-1]}, "{key}": {json.dumps(header[key])}}}', data)


def overlap_offsets(header: dict[str, Any], data: bytes) -> bytes:
    last = header[last_tensor(header)]
    last["data_offsets"] = [o - 4 for o in last["data_offsets"]]
    return raw_file(header, data[:-4])


def gap_in_offsets(header: dict[str, Any], data: bytes) -> bytes:
    last = header[last_tensor(header)]
    last["data_offsets"] = [o + 8 for o in last["data_offsets"]]
    begin = last["data_offsets"][0] - 8
    return raw_file(header, data[:begin] + b"\0" * 8 + data[begin:])


def set_entry(key: str, field: str, value: Any) -> Corruption:
    def edit(header: dict[str, Any], data: bytes) -> bytes:
        header[key][field] = value
        return raw_file(header, data)

    return edit_header(edit)


def drop_offsets(header: dict[str, Any], data: bytes) -> bytes:
    del header["layers.0.up_proj.weight"]["data_offsets"]
    return raw_file(header, data)


def bad_metadata(header: dict[str, Any], data: bytes) -> bytes:
    header["__metadata__"] = {"format": 1}
    return raw_file(header, data)


def as_f64(bundle: Path, anchor: Anchor) -> None:
    tensors = load_tensors(bundle / EXPERT_WEIGHTS)
    blob = raw_tensors({k: ("F64", t.double()) for k, t in tensors.items()})
    (bundle / EXPERT_WEIGHTS).write_bytes(blob)


def i64_bias(bundle: Path, anchor: Anchor) -> None:
    tensors: dict[str, tuple[str, torch.Tensor]] = {
        k: ("F32", t.float()) for k, t in load_tensors(bundle / EXPERT_WEIGHTS).items()
    }
    tensors["layers.0.router.bias"] = ("I64", torch.tensor([7], dtype=torch.int64))
    (bundle / EXPERT_WEIGHTS).write_bytes(raw_tensors(tensors))


def cast(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        for k in t:
            t[k] = t[k].to(dtype)

    return edit


def set_value(key: str, index: tuple[int, ...], value: float) -> Callable[..., None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[key][index] = value

    return edit


def oversize_weights(bundle: Path, anchor: Anchor) -> None:
    with open(bundle / EXPERT_WEIGHTS, "r+b") as f:
        f.truncate(max_weights_bytes(anchor) + 1)  # sparse: cheap however large


def oversize_meta(bundle: Path, anchor: Anchor) -> None:
    path = bundle / EXPERT_META
    path.write_text(path.read_text() + " " * MAX_META_BYTES)


def oversize_signature(bundle: Path, anchor: Anchor) -> None:
    with open(bundle / SIGNATURE, "wb") as f:
        f.truncate(MAX_ATTESTATION_BYTES + 1)


def symlink_weights(bundle: Path, anchor: Anchor) -> None:
    # A link to a perfectly valid file is still refused: a bundle holds its own bytes.
    elsewhere = bundle.parent / "elsewhere.safetensors"
    (bundle / EXPERT_WEIGHTS).rename(elsewhere)
    (bundle / EXPERT_WEIGHTS).symlink_to(elsewhere)


def symlink_signature(bundle: Path, anchor: Anchor) -> None:
    (bundle / SIGNATURE).symlink_to(anchor.path / "config.json")


def provenance_is_folder(bundle: Path, anchor: Anchor) -> None:
    (bundle / PROVENANCE).mkdir()


def extra_file(bundle: Path, anchor: Anchor) -> None:
    (bundle / "notes.txt").write_text("trained on the good data\n")


def remove(name: str) -> Corruption:
    def corrupt(bundle: Path, anchor: Anchor) -> None:
        (bundle / name).unlink()

    return corrupt


def not_a_directory(bundle: Path, anchor: Anchor) -> None:
    shutil.rmtree(bundle)
    bundle.write_bytes(b"PK\x03\x04")


def other_family(doc: dict[str, Any], anchor: Anchor) -> None:
    doc["family"] = OTHER_FAMILY[anchor.family.dense_model_type]


def bigger_hidden(doc: dict[str, Any], anchor: Anchor) -> None:
    doc["shapes"]["hidden_size"] += 1


def with_nan_loss(doc: dict[str, Any], anchor: Anchor) -> None:
    doc["training"]["final_loss"] = float("nan")  # json.dumps writes the non-JSON `NaN`


# --- the catalogue ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    corrupt: Corruption
    error: type[FlexfedError]
    message: str  # a regex the message must contain; it matches no other case's message


CASES = [
    # the directory
    Case("missing-expert-json", remove(EXPERT_META), MissingFileError, r"expert\.json is missing"),
    Case(
        "missing-weights",
        remove(EXPERT_WEIGHTS),
        MissingFileError,
        r"expert\.safetensors is missing",
    ),
    Case("not-a-directory", not_a_directory, MissingFileError, r"is not a directory"),
    Case(
        "unexpected-file",
        extra_file,
        BundleError,
        r"unexpected files in an expert bundle: notes\.txt",
    ),
    Case(
        "symlinked-weights",
        symlink_weights,
        BundleError,
        r"expert\.safetensors is a symbolic link",
    ),
    Case("symlinked-signature", symlink_signature, BundleError, r"model\.sig is a symbolic link"),
    Case(
        "provenance-is-a-folder",
        provenance_is_folder,
        BundleError,
        r"provenance\.intoto\.json is not a plain file",
    ),
    # sizes
    Case(
        "oversize-weights",
        oversize_weights,
        BundleError,
        r"expert\.safetensors is \d+ bytes; an expert for this anchor is at most \d+",
    ),
    Case(
        "oversize-expert-json",
        oversize_meta,
        BundleError,
        r"expert\.json is \d+ bytes; a valid expert\.json is at most",
    ),
    Case(
        "oversize-signature",
        oversize_signature,
        BundleError,
        r"model\.sig is \d+ bytes; a valid model\.sig is at most",
    ),
    # expert.json
    Case(
        "expert-json-not-json",
        write_meta_text(lambda s: s[: len(s) // 2]),
        MetadataError,
        r"expert\.json is not valid UTF-8 JSON",
    ),
    Case(
        "expert-json-not-object",
        write_meta_text(lambda s: f"[{s}]"),
        MetadataError,
        r"expert\.json must be a JSON object",
    ),
    Case(
        "expert-json-deep-nesting",
        write_meta_text(lambda s: "[" * 100_000),
        MetadataError,
        r"expert\.json nests too deeply",
    ),
    Case(
        "expert-json-duplicate-key",
        write_meta_text(lambda s: s.replace("{", '{"org": "mallory", ', 1)),
        MetadataError,
        r"has the key 'org' twice",
    ),
    Case(
        "expert-json-nan-literal",
        edit_meta(with_nan_loss),
        MetadataError,
        r"holds NaN, which is not JSON",
    ),
    Case(
        "expert-json-missing-field",
        edit_meta(lambda d, a: d.pop("data_commitment")),
        MetadataError,
        r"fields are wrong; missing: data_commitment",
    ),
    Case(
        "expert-json-unknown-field",
        edit_meta(lambda d, a: d.update(backdoor=True)),
        MetadataError,
        r"fields are wrong; unexpected: backdoor",
    ),
    Case(
        "expert-json-bad-org",
        edit_meta(lambda d, a: d.update(org="../evil")),
        MetadataError,
        r"org '\.\./evil' must be 1-64 letters",
    ),
    Case(  # issue 12: "acme" + "labs--x" and "acme--labs" + "x" shared a slot folder
        "expert-json-org-with-separator",
        edit_meta(lambda d, a: d.update(org="acme--labs")),
        MetadataError,
        r"org 'acme--labs' must be 1-64 letters, digits, '\.', '_' or '-', starting with a "
        r"letter or digit, no '--'",
    ),
    Case(
        "expert-json-name-with-separator",
        edit_meta(lambda d, a: d.update(name="labs--x")),
        MetadataError,
        r"name 'labs--x' must be 1-64 letters",
    ),
    Case(
        "expert-json-bad-format",
        edit_meta(lambda d, a: d.update(format="flexfed.expert/v0")),
        MetadataError,
        r"format must be 'flexfed\.expert/v1', got 'flexfed\.expert/v0'",
    ),
    Case(
        "expert-json-digest-not-hex",
        edit_meta(lambda d, a: d.update(anchor_digest="F" * 64)),
        MetadataError,
        r"anchor_digest must be 64 lowercase hex digits",
    ),
    Case(
        "expert-json-shapes-malformed",
        edit_meta(lambda d, a: d["shapes"].update(dtype=["F32"])),
        MetadataError,
        r"'shapes' is malformed",
    ),
    # the anchor
    Case(
        "wrong-family",
        edit_meta(other_family),
        AnchorMismatchError,
        r"expert family '\w+' does not match the anchor's",
    ),
    Case(
        "wrong-anchor-digest",
        edit_meta(lambda d, a: d.update(anchor_digest="f" * 64)),
        AnchorMismatchError,
        r"trained on anchor f{16}\.\.\., not this anchor",
    ),
    Case(
        "wrong-shapes-in-expert-json",
        edit_meta(bigger_hidden),
        AnchorMismatchError,
        r"expert\.json shapes .* differ from the anchor's",
    ),
    # the safetensors header
    Case("empty-weights", empty_weights, SafetensorsFormatError, r"truncated \(no header length\)"),
    Case(
        "truncated-header",
        truncate_header,
        SafetensorsFormatError,
        r"truncated \(header runs past the end\)",
    ),
    Case(
        "truncated-data",
        truncate_weights,
        SafetensorsFormatError,
        r"truncated \(\d+ bytes, the header promises \d+\)",
    ),
    Case(
        "oversize-header-length",
        edit_header(lambda h, d: raw_file(h, d, length=2**40)),
        SafetensorsFormatError,
        r"header of 1099511627776 bytes exceeds the \d+-byte limit",
    ),
    Case(
        "header-not-json",
        edit_header(lambda h, d: raw_file(b"\x00garbage{not json", d)),
        SafetensorsFormatError,
        r"header is not valid JSON",
    ),
    Case(
        "header-not-object",
        edit_header(lambda h, d: raw_file("[]", d)),
        SafetensorsFormatError,
        r"header is not a JSON object",
    ),
    Case(
        "header-deep-nesting",
        edit_header(lambda h, d: raw_file("[" * 100_000, b"")),
        SafetensorsFormatError,
        r"header nests too deeply",
    ),
    Case(
        "duplicate-key",
        edit_header(duplicate_key),
        SafetensorsFormatError,
        r"duplicate key 'layers\.0\.router\.bias' in the header",
    ),
    Case(
        "overlapping-offsets",
        edit_header(overlap_offsets),
        SafetensorsFormatError,
        r"tensor '[\w.]+' overlaps another tensor",
    ),
    Case(
        "gap-in-offsets",
        edit_header(gap_in_offsets),
        SafetensorsFormatError,
        r"gap in the data before tensor",
    ),
    Case(
        "trailing-bytes",
        edit_header(lambda h, d: raw_file(h, d + b"\0" * 16)),
        SafetensorsFormatError,
        r"16 trailing bytes",
    ),
    Case(
        "offsets-do-not-match-shape",
        set_entry("layers.0.router.bias", "shape", [2]),
        SafetensorsFormatError,
        r"'layers\.0\.router\.bias' spans 4 bytes but its shape and dtype need 8",
    ),
    Case(
        "malformed-shape",
        set_entry("layers.0.router.bias", "shape", [-1]),
        SafetensorsFormatError,
        r"has a malformed shape",
    ),
    Case(
        "malformed-offsets",
        set_entry("layers.0.router.bias", "data_offsets", [8, 4]),
        SafetensorsFormatError,
        r"has malformed offsets",
    ),
    Case(
        "entry-without-offsets",
        edit_header(drop_offsets),
        SafetensorsFormatError,
        r"malformed entry for 'layers\.0\.up_proj\.weight'",
    ),
    Case(
        "dtype-not-a-string",
        set_entry("layers.0.router.bias", "dtype", ["F32"]),
        SafetensorsFormatError,
        r"has dtype \['F32'\]; allowed",
    ),
    Case(
        "malformed-metadata",
        edit_header(bad_metadata),
        SafetensorsFormatError,
        r"__metadata__ must map strings to strings",
    ),
    Case("dtype-i64", i64_bias, SafetensorsFormatError, r"has dtype 'I64'; allowed: \["),
    Case("dtype-f64", as_f64, SafetensorsFormatError, r"has dtype 'F64'; allowed: \["),
    # tensors
    Case(
        "missing-tensor",
        edit_tensors(lambda t: t.pop("layers.1.down_proj.weight")),
        TensorMismatchError,
        r"lacks 1 tensor\(s\), e\.g\. layers\.1\.down_proj\.weight",
    ),
    Case(
        "extra-tensor",
        edit_tensors(lambda t: t.update({"layers.0.backdoor.weight": torch.zeros(4)})),
        TensorMismatchError,
        r"has 1 unexpected tensor\(s\), e\.g\. layers\.0\.backdoor\.weight",
    ),
    Case(
        "wrong-shape",
        edit_tensors(lambda t: t.update({"layers.0.down_proj.weight": torch.zeros(64, 32)})),
        TensorMismatchError,
        r"layers\.0\.down_proj\.weight has shape \[64, 32\]; this anchor needs \[32, 64\]",
    ),
    Case(
        "dtype-f16",
        edit_tensors(cast(torch.float16)),
        TensorMismatchError,
        r"is F16; this anchor's weights are F32",
    ),
    Case(
        "dtype-bf16",
        edit_tensors(cast(torch.bfloat16)),
        TensorMismatchError,
        r"is BF16; this anchor's weights are F32",
    ),
    # values
    Case(
        "nan",
        edit_tensors(set_value("layers.0.up_proj.weight", (3, 5), float("nan"))),
        NonFiniteTensorError,
        r"layers\.0\.up_proj\.weight holds 1 NaN and 0 infinite value",
    ),
    Case(
        "positive-inf",
        edit_tensors(set_value("layers.1.router.weight", (3,), float("inf"))),
        NonFiniteTensorError,
        r"layers\.1\.router\.weight holds 0 NaN and 1 infinite value",
    ),
    Case(
        "negative-inf-bias",
        edit_tensors(set_value("layers.1.router.bias", (0,), float("-inf"))),
        NonFiniteTensorError,
        r"layers\.1\.router\.bias holds 0 NaN and 1 infinite value",
    ),
]


def make_bad(case: Case, good: Path, anchor: Anchor, where: Path) -> Path:
    bad = where / "bundle"
    shutil.copytree(good, bad)
    case.corrupt(bad, anchor)
    return bad


def refusal(case: Case, bad: Path, anchor: Anchor) -> FlexfedError:
    with pytest.raises(FlexfedError) as info:
        validate_bundle(bad, anchor)
    return info.value


@pytest.fixture
def good(expert_factory: Callable[..., Path]) -> Path:
    return expert_factory("acme", seed=3)


def test_the_pristine_bundle_is_valid(anchor: Anchor, good: Path) -> None:
    """The starting point of every case passes, so each failure is the corruption's."""
    assert anchor.shapes.dtype == "F32"  # the dtype cases assume F32 anchors
    assert validate_bundle(good, anchor).org == "acme"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_bundle_is_refused(case: Case, anchor: Anchor, good: Path, tmp_path: Path) -> None:
    """The defect raises its own error class with a one-line message naming the problem."""
    bad = make_bad(case, good, anchor, tmp_path / "bad")
    err = refusal(case, bad, anchor)
    assert type(err) is case.error, f"{type(err).__name__}: {err}"
    assert re.search(case.message, str(err)), str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_assembly_with_a_bad_bundle_leaves_nothing(
    case: Case, anchor: Anchor, good: Path, tmp_path: Path
) -> None:
    """Assembly refuses the bundle; neither the output nor a temporary directory appears."""
    bad = make_bad(case, good, anchor, tmp_path / "bad")
    models = tmp_path / "models"
    models.mkdir()
    out = models / "moe"
    with pytest.raises(case.error):
        assemble(anchor, [good, bad], out, top_k=2)
    assert not out.exists()
    assert list(models.iterdir()) == []  # no .moe.tmp-* left behind


def test_every_defect_has_a_distinct_message(anchor: Anchor, good: Path, tmp_path: Path) -> None:
    """No two defects read alike: each case's pattern matches its own message only."""
    messages = {}
    for i, case in enumerate(CASES):
        bad = make_bad(case, good, anchor, tmp_path / str(i))
        messages[case.id] = str(refusal(case, bad, anchor))
    for case in CASES:
        alike = [other for other, msg in messages.items() if re.search(case.message, msg)]
        assert alike == [case.id], f"{case.id}'s pattern also matches {alike}"
    assert len(CASES) >= 14
