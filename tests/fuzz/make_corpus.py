"""Writes the seed corpus of tests/fuzz/fuzz_header.cc into tests/fuzz/corpus/header/ (deterministic;
the files are committed, rerun after changing this). Inputs starting with '{' / '[' / whitespace are
header JSON (the target wraps them into a file), others are whole files. Every failure of issue 11's
checkpoint side is here, and large inputs (> 8 KB: deep nesting, many tensors) that small-input
fuzzing missed.

    python tests/fuzz/make_corpus.py
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

OUT = Path(__file__).resolve().parent / "corpus" / "header"
DEEP = 70_000


def j(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def e(dtype="F32", shape=(2,), off=(0, 8), **extra):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(off), **extra}


def whole(header: bytes, data: bytes = b"", length=None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def nest(o: bytes, c: bytes, n=DEEP) -> bytes:
    return o * n + c * n


def seeds() -> dict[str, bytes]:
    s = {
        # valid
        "valid-two": j({"__metadata__": {"format": "pt"}, "a": e(), "b": e("I8", (3,), (8, 11))}),
        "valid-dtypes": j({f"t{i}": e(d, (4,), (4 * i, 4 * i + 4)) for i, d in enumerate(["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"])}),
        "valid-f4": j({"a": e("F4", (2, 4), (0, 4))}),
        "valid-zero": j({"z": e(shape=(0, 5), off=(0, 0)), "a": e()}),
        "valid-empty": b"{}",
        "valid-spaces": b"  " + j({"a": e()}) + b" \n",
        "valid-extra-fields": j({"a": e(extra={"k": [1, {"x": None}]})}),
        "valid-whole-file": whole(j({"a": e()}), b"\1" * 8),
        # one per rule
        "rule-header-json": b'{"a": {"dtype": "F32",',
        "rule-not-object": b"[1, 2, 3]",
        "rule-duplicate": b'{"a":' + j(e()) + b',"a":' + j(e(off=(8, 16))) + b"}",
        "rule-duplicate-field": b'{"a":{"dtype":"F32","dtype":"I32","shape":[2],"data_offsets":[0,8]}}',
        "rule-metadata": j({"__metadata__": {"n": 3}, "a": e()}),
        "rule-entry-fields": j({"a": {"dtype": "F32", "shape": [2]}}),
        "rule-dtype": j({"a": e("F128")}),
        "rule-shape": j({"a": e(shape=(2, -1))}),
        "rule-offsets": j({"a": e(off=(8, 0))}),
        "rule-size-overflow": j({"a": e(shape=(2**40, 2**40))}),
        "rule-sub-byte": j({"a": e("F4", (3,), (0, 2))}),
        "rule-gap": j({"a": e(), "b": e(off=(12, 20))}),
        "rule-overlap": j({"a": e(), "b": e(off=(4, 12))}),
        "rule-huge-offsets": j({"a": e(off=(2**64 - 1, 2**64 - 1))}),
        "rule-utf8": b'{"a\xff":{}}',
        "rule-too-small": b"\x01\x00\x00",
        "rule-header-too-large": whole(j({"a": e()}), b"\0" * 8, length=100_000_001),
        "rule-header-past-eof": whole(j({"a": e()}), b"", length=4096),
        # issue 11 item 11: validates, then torch's "Stride calculation overflowed"
        "issue11-zero-size-huge-dims": j({"z": e(shape=(0, 4294967293, 4294967295), off=(0, 0))}),
        "issue11-zero-size-huge-dims-f4": j({"z": e("F4", (0, 2**62, 4), (0, 0))}),
        # issue 13: a text file read as a length (not-safetensors)
        "issue13-text-file": b"hello world, this is a text file and not a checkpoint\n" * 4,
        # issue 11 item 2: nesting ~70,000 deep (stack overflow while printing the error)
        "issue11-deep-dtype": b'{"a":{"dtype":' + nest(b"[", b"]") + b',"shape":[2],"data_offsets":[0,8]}}',
        "issue11-deep-shape": b'{"a":{"dtype":"F32","shape":' + nest(b"[", b"]") + b',"data_offsets":[0,8]}}',
        "issue11-deep-offsets": b'{"a":{"dtype":"F32","shape":[2],"data_offsets":' + nest(b"[", b"]") + b"}}",
        "issue11-deep-metadata": b'{"__metadata__":' + nest(b'{"k":', b"}").replace(b'{"k":}', b'{"k":"v"}') + b"}",
        "issue11-deep-objects": b'{"a":' + nest(b'{"a":', b"}").replace(b'{"a":}', b"{}") + b"}",
        "issue11-deep-top": nest(b"[", b"]"),
        "issue11-deep-unclosed": b'{"a":{"dtype":' + b"[" * DEEP,
        "issue11-deep-whole-file": whole(b'{"a":{"dtype":"F32","shape":' + nest(b"[", b"]", 20_000) + b',"data_offsets":[0,8]}}', b"\0" * 8),
    }
    # issue 11 item 4: many tensors (quadratic before); JSON order differs from offset order
    n = 5000
    order = list(range(0, n, 2)) + list(range(1, n, 2))
    s["issue11-many-tensors"] = j({f"model.layers.{i // 7}.mlp.w{i % 7}": e("I32", (1,), (4 * i, 4 * i + 4)) for i in order})
    # issue 11 item 7: nested objects in an ignored field of every entry (69x the text in RSS as a DOM)
    nested = "{" + '"k":{' * 40 + "}" * 40 + "}"
    s["issue11-nested-objects-ignored"] = ("{" + ",".join(
        f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}],"x":{nested}}}' for i in range(400)) + "}").encode()
    s["issue11-wide-metadata"] = j({"__metadata__": {f"key{i}": "v" * (i % 13) for i in range(2000)}, "a": e()})
    return s


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    for name, data in seeds().items():
        (OUT / name).write_bytes(data)
    sizes = [len(d) for d in seeds().values()]
    print(f"{len(sizes)} seeds, {sum(sizes)} bytes, {sum(s > 8192 for s in sizes)} over 8 KB, largest {max(sizes)}")


if __name__ == "__main__":
    main()
