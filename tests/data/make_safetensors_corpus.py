"""Write tests/data/safetensors_corpus/: small valid and malformed safetensors files, one per rule.

    python tests/data/make_safetensors_corpus.py [--check]

Each file is named for what the `safetensors` library (0.8.0, the oracle) does with it: `ok-*` it
loads, `bad-*` it refuses, `diff-*` it loads but shortrt deliberately refuses (shapes beyond int64).
Writing a file asserts that the library still agrees with its name, so running this script is also a
record of the rules shortrt copied from the library (see csrc/safetensors.h). tests/test_safetensors.py
runs every file through both readers; fuzz/run.sh uses the directory as its seed corpus. With
--check nothing is written: the script only confirms the committed files match what it would write.
"""
import json
import struct
import sys
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "safetensors_corpus"


def raw(header, data=b"", *, n=None):
    """8-byte length (default: the header's own), header (dict -> compact JSON, or bytes), data."""
    blob = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(blob) if n is None else n) + blob + data


def t(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def entry(body):
    """A header with one tensor 'a' whose JSON object is `body` (raw text), 8 data bytes."""
    return raw(b'{"a":' + body + b"}", bytes(8))


A8 = b'{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'  # 'a' F32 [2] over 8 bytes
DATA16 = bytes(range(16))


def cases():
    c = {}
    # ---- valid ----
    c["ok-two-tensors"] = raw({"a": t("F32", [2], 0, 8), "b": t("I32", [2], 8, 16)}, DATA16)
    c["ok-header-order-differs-from-data"] = raw({"b": t("F32", [2], 8, 16), "a": t("F32", [2], 0, 8)}, DATA16)
    c["ok-padded-with-spaces"] = raw(b'{"a":' + A8 + b"}" + b" " * 5, bytes(8))
    c["ok-padded-tab-newline-cr"] = raw(b'{"a":' + A8 + b"}\t\n\r", bytes(8))
    c["ok-leading-whitespace"] = raw(b'  \n{"a":' + A8 + b"}", bytes(8))
    c["ok-empty-header"] = raw(b"{}")
    c["ok-metadata-only"] = raw({"__metadata__": {"format": "pt"}})
    c["ok-metadata-null"] = raw(b'{"__metadata__":null}')
    c["ok-metadata-repeated-key-last-wins"] = raw(b'{"__metadata__":{"k":"1","k":"2"}}')
    c["ok-metadata-escaped-key-name"] = raw(b'{"__metadat\\u0061__":{"k":"v"}}')
    c["ok-scalar"] = raw({"s": t("I64", [], 0, 8)}, bytes(8))
    c["ok-empty-tensor-at-end"] = raw({"a": t("F32", [2], 0, 8), "e": t("F32", [0, 3], 8, 8)}, bytes(8))
    c["ok-empty-tensors-same-offset"] = raw({"e": t("F32", [0], 0, 0), "f": t("U8", [0, 0], 0, 0)})
    c["ok-empty-tensor-between"] = raw({"a": t("F32", [1], 0, 4), "e": t("F32", [0], 4, 4),
                                        "b": t("F32", [1], 4, 8)}, bytes(8))
    c["ok-zero-dim-first-huge-rest"] = raw({"a": t("F32", [0, 2**40, 2**40], 0, 0)})
    # The product before the zero dim is 2^63: fits u64 (so the library accepts it), not int64.
    c["ok-zero-dim-after-2-pow-63"] = raw({"a": t("U8", [2**32, 2**31, 0], 0, 0)})
    c["ok-repeated-tensor-name-last-wins"] = raw(b'{"a":{"dtype":"F32","shape":[8],"data_offsets":[8,40]},"a":' + A8 + b"}",
                                                 bytes(8))
    c["ok-entry-as-array"] = raw(b'{"a":["F32",[2],[0,8]]}', bytes(8))
    c["ok-dtype-as-single-key-object"] = entry(b'{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}')
    c["ok-unknown-entry-fields-ignored"] = entry(b'{"dtype":"F32","x":[[{"y":1e-400}]],"x":0,"shape":[2],"data_offsets":[0,8]}')
    c["ok-escaped-field-name"] = entry(b'{"\\u0064type":"F32","shape":[2],"data_offsets":[0,8]}')
    c["ok-unicode-names"] = raw({"w\u00e9\u4e2d\U0001f600": t("U8", [1], 0, 1), "__metadata__": {"\u00e9": "\u2713"}}, b"x")
    c["ok-empty-name-and-del-byte"] = raw(b'{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"\x7f":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy")
    c["ok-f4-even-count"] = raw({"a": t("F4", [4], 0, 2)}, b"ab")
    c["ok-f6-four-elements"] = raw({"a": t("F6_E2M3", [4], 0, 3)}, b"abc")
    c["ok-f8-and-c64"] = raw({"a": t("F8_E4M3FNUZ", [2], 0, 2), "c": t("C64", [1], 2, 10)}, bytes(10))
    c["ok-every-dtype"] = _every_dtype()
    c["ok-numbers-serde-reads-as-zero"] = entry(b'{"dtype":"F32","z":[1e-99999999999999999999,0e99999,'
                                                + b"9" * 30 + b"e-400,0." + b"0" * 400 + b'1e300],"shape":[2],"data_offsets":[0,8]}')
    # Header object, entry object and 125 arrays: 127 levels, serde_json's most.
    c["ok-nesting-127-levels"] = entry(b'{"dtype":"F32","shape":[2],"data_offsets":[0,8],"z":' + b"[" * 125 + b"]" * 125 + b"}")
    # ---- the header length and the data section ----
    c["bad-file-shorter-than-length-field"] = b"\x02\x00\x00"
    c["bad-header-length-past-end"] = raw(b'{"a":' + A8 + b"}", bytes(8), n=200)
    c["bad-header-length-over-limit"] = struct.pack("<Q", 100_000_001) + b"{}"
    c["bad-header-length-huge"] = struct.pack("<Q", 2**64 - 1) + b"{}"
    c["bad-header-length-zero"] = struct.pack("<Q", 0)
    c["bad-header-length-cuts-json"] = raw(b'{"a":' + A8 + b"}", bytes(8), n=50)
    # The bug that loaded shifted NaN weights: a length a few bytes short of the padding leaves
    # spaces at the start of the data section.
    c["bad-header-length-short-of-padding"] = raw(b'{"a":' + A8 + b"}" + b" " * 6, bytes(8), n=57)
    c["bad-header-length-long-into-data"] = raw(b'{"a":' + A8 + b"}", b"\x01\x02" + bytes(8), n=56)
    c["bad-trailing-data-bytes"] = raw({"a": t("F32", [2], 0, 8)}, bytes(9))
    c["bad-data-bytes-without-tensors"] = raw(b"{}", b"x")
    c["bad-gap-between-tensors"] = raw({"a": t("F32", [1], 0, 4), "b": t("F32", [1], 8, 12)}, bytes(12))
    c["bad-first-tensor-not-at-zero"] = raw({"a": t("F32", [1], 4, 8)}, bytes(8))
    c["bad-overlap"] = raw({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, bytes(12))
    c["bad-same-range-twice"] = raw({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 0, 8)}, bytes(8))
    c["bad-empty-tensor-inside-another"] = raw({"a": t("F32", [2], 0, 8), "e": t("F32", [0], 4, 4)}, bytes(8))
    c["bad-begin-after-end"] = raw({"e": t("F32", [0], 0, 0), "b": t("F32", [0], 4, 0)})
    c["bad-offsets-past-data"] = raw({"a": t("F32", [4], 0, 16)}, bytes(8))
    c["bad-size-mismatch"] = raw({"a": t("F32", [3], 0, 8)}, bytes(8))
    c["bad-shape-overflow"] = raw({"a": t("F32", [2**40, 2**40, 0], 0, 0)})
    c["bad-bytes-overflow"] = raw({"a": t("U8", [2**63], 0, 0)})
    c["bad-f4-odd-count"] = raw({"a": t("F4", [3], 0, 2)}, b"ab")
    c["bad-repeated-name-last-entry-wrong"] = raw(b'{"a":' + A8 + b',"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
                                                  bytes(8))
    c["bad-repeated-name-first-entry-malformed"] = raw(b'{"a":"x","a":' + A8 + b"}", bytes(8))
    # ---- dims and offsets ----
    c["bad-dim-float"] = entry(b'{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}')
    c["bad-dim-exponent"] = entry(b'{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}')
    c["bad-dim-negative"] = entry(b'{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}')
    c["bad-dim-negative-zero"] = raw(b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}')
    c["bad-dim-beyond-u64"] = raw(b'{"a":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}')
    c["bad-dim-string"] = entry(b'{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}')
    c["bad-dim-bool"] = entry(b'{"dtype":"F32","shape":[true],"data_offsets":[0,8]}')
    c["bad-dim-leading-zero"] = entry(b'{"dtype":"F32","shape":[02],"data_offsets":[0,8]}')
    c["bad-dim-plus-sign"] = entry(b'{"dtype":"F32","shape":[+2],"data_offsets":[0,8]}')
    c["bad-offset-float"] = entry(b'{"dtype":"F32","shape":[2],"data_offsets":[0.0,8]}')
    c["bad-offset-negative-zero"] = entry(b'{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}')
    c["bad-offsets-one"] = entry(b'{"dtype":"F32","shape":[2],"data_offsets":[0]}')
    c["bad-offsets-three"] = entry(b'{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}')
    c["bad-offsets-object"] = entry(b'{"dtype":"F32","shape":[2],"data_offsets":{"0":0,"1":8}}')
    c["bad-shape-not-array"] = entry(b'{"dtype":"F32","shape":2,"data_offsets":[0,8]}')
    c["bad-shape-null"] = entry(b'{"dtype":"F32","shape":null,"data_offsets":[0,8]}')
    c["diff-dim-beyond-int64"] = raw(b'{"a":{"dtype":"U8","shape":[18446744073709551615,0],"data_offsets":[0,0]}}')
    # ---- entries and dtypes ----
    c["bad-unknown-dtype"] = entry(b'{"dtype":"F8_E9M9","shape":[2],"data_offsets":[0,8]}')
    c["bad-dtype-lowercase"] = entry(b'{"dtype":"f32","shape":[2],"data_offsets":[0,8]}')
    c["bad-dtype-number"] = entry(b'{"dtype":4,"shape":[2],"data_offsets":[0,8]}')
    c["bad-dtype-object-not-null"] = entry(b'{"dtype":{"F32":[]},"shape":[2],"data_offsets":[0,8]}')
    c["bad-dtype-object-two-keys"] = entry(b'{"dtype":{"F32":null,"I32":null},"shape":[2],"data_offsets":[0,8]}')
    c["bad-dtype-empty-object"] = entry(b'{"dtype":{},"shape":[2],"data_offsets":[0,8]}')
    c["bad-missing-dtype"] = entry(b'{"shape":[2],"data_offsets":[0,8]}')
    c["bad-missing-shape"] = entry(b'{"dtype":"F32","data_offsets":[0,8]}')
    c["bad-missing-offsets"] = entry(b'{"dtype":"F32","shape":[2]}')
    c["bad-repeated-field"] = entry(b'{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}')
    c["bad-repeated-field-escaped"] = entry(b'{"\\u0064type":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}')
    c["bad-entry-string"] = raw(b'{"a":"x"}')
    c["bad-entry-null"] = raw(b'{"a":null}')
    c["bad-entry-array-two"] = raw(b'{"a":["F32",[2]]}', bytes(8))
    c["bad-entry-array-four"] = raw(b'{"a":["F32",[2],[0,8],5]}', bytes(8))
    # ---- metadata ----
    c["bad-metadata-number-value"] = raw(b'{"__metadata__":{"format":1}}')
    c["bad-metadata-object-value"] = raw(b'{"__metadata__":{"format":{}}}')
    c["bad-metadata-array"] = raw(b'{"__metadata__":["x"]}')
    c["bad-metadata-twice"] = raw(b'{"__metadata__":{},"__metadata__":{}}')
    c["bad-metadata-tensor-shaped"] = raw(b'{"__metadata__":' + A8 + b"}", bytes(8))
    # ---- JSON as serde_json reads it ----
    c["bad-header-array"] = raw(b"[1,2,3]")
    c["bad-header-string"] = raw(b'"{}"')
    c["bad-header-empty"] = raw(b"")
    c["bad-header-whitespace-only"] = raw(b"   ")
    c["bad-trailing-nul-padding"] = raw(b'{"a":' + A8 + b"}\x00\x00", bytes(8))
    c["bad-trailing-formfeed"] = raw(b'{"a":' + A8 + b"}\x0c", bytes(8))
    c["bad-trailing-garbage"] = raw(b'{"a":' + A8 + b"} x", bytes(8))
    c["bad-second-document"] = raw(b"{} {}")
    c["bad-utf8-bom"] = raw(b"\xef\xbb\xbf{}")
    c["bad-invalid-utf8"] = raw(b'{"__metadata__":{"\xff":"x"}}')
    c["bad-invalid-utf8-overlong"] = raw(b'{"__metadata__":{"\xc0\xaf":"x"}}')
    c["bad-invalid-utf8-surrogate"] = raw(b'{"__metadata__":{"\xed\xa0\x80":"x"}}')
    c["bad-lone-high-surrogate"] = raw(b'{"__metadata__":{"\\ud83d":"x"}}')
    c["bad-lone-low-surrogate"] = raw(b'{"__metadata__":{"\\ude00":"x"}}')
    c["bad-high-surrogate-then-bmp"] = raw(b'{"__metadata__":{"\\ud83d\\u0041":"x"}}')
    c["bad-control-char-in-string"] = raw(b'{"__metadata__":{"a\tb":"x"}}')
    c["bad-invalid-escape"] = raw(b'{"__metadata__":{"\\x41":"x"}}')
    c["bad-key-not-string"] = raw(b"{1:2}")
    c["bad-trailing-comma"] = entry(b'{"dtype":"F32","shape":[2,],"data_offsets":[0,8]}')
    c["bad-trailing-comma-object"] = raw(b'{"__metadata__":{},}')
    c["bad-nan-literal"] = entry(b'{"dtype":"F32","z":NaN,"shape":[2],"data_offsets":[0,8]}')
    c["bad-truncated-literal"] = entry(b'{"dtype":"F32","z":tru,"shape":[2],"data_offsets":[0,8]}')
    c["bad-number-out-of-range"] = entry(b'{"dtype":"F32","z":1e400,"shape":[2],"data_offsets":[0,8]}')
    # serde_json's float arithmetic overflows on the largest double written with 17 digits.
    c["bad-number-serde-overflows"] = entry(b'{"dtype":"F32","z":1.7976931348623158e308,"shape":[2],"data_offsets":[0,8]}')
    c["bad-long-integer-out-of-range"] = entry(b'{"dtype":"F32","z":' + b"9" * 400 + b',"shape":[2],"data_offsets":[0,8]}')
    c["bad-nesting-128-levels"] = entry(b'{"dtype":"F32","shape":[2],"data_offsets":[0,8],"z":' + b"[" * 126 + b"]" * 126 + b"}")
    c["bad-nesting-deep-unclosed"] = raw(b'{"a":' + b"[" * 5000)
    return c


def _every_dtype():
    bits = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
            "BOOL": 8, "U16": 16, "U32": 32, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E5M2": 8,
            "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "C64": 64}
    header, offset = {}, 0
    for name, b in bits.items():
        nbytes = 4 * b // 8  # shape [4]: a whole number of bytes for every type
        header[name] = t(name, [4], offset, offset + nbytes)
        offset += nbytes
    return raw(header, bytes(i % 251 for i in range(offset)))


def library_accepts(blob):
    import safetensors

    try:
        safetensors.deserialize(blob)
        return True
    except Exception:  # SafetensorError, and whatever else it raises for garbage
        return False


def main():
    check = "--check" in sys.argv[1:]
    problems = []
    for name, blob in cases().items():
        want = not name.startswith("bad-")
        if library_accepts(blob) != want:
            problems.append(f"{name}: the safetensors library now {'accepts' if not want else 'rejects'} it")
        path = CORPUS / f"{name}.safetensors"
        if check:
            if not path.exists() or path.read_bytes() != blob:
                problems.append(f"{path} differs from what this script writes")
        else:
            CORPUS.mkdir(exist_ok=True)
            path.write_bytes(blob)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{len(cases())} files {'checked' if check else 'written'} in {CORPUS}")


if __name__ == "__main__":
    main()
