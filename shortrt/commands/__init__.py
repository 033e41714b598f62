"""The `shortrt` subcommands, one module each, and the argument types they share.

Each type turns a bad value into argparse's one-line "argument --x: ..." error instead of a
traceback later (a negative seed, a count past what the runtime's 32-bit fields hold, text
that is not UTF-8).
"""
from __future__ import annotations

import argparse
import math

INT32_MAX = 2**31 - 1

# The engine's weight and KV-cache formats (shortrt.engine.DTYPES / LM_HEAD_DTYPES / KV_DTYPES,
# repeated here so that building the parser does not import numpy; tests/test_cli_errors.py keeps
# them equal).
DTYPES = ("fp32", "bf16", "int8", "int4")
LM_HEAD_DTYPES = ("auto", "same") + DTYPES
KV_DTYPES = ("fp32", "f16", "bf16", "int8")


def add_dtype_arguments(parser, default: str | None = "fp32", kv: bool = False, device: bool = False) -> None:
    """--dtype and --lm-head-dtype (and with kv, --kv-dtype; with device, --device), as generate and
    serve take them. With device, --dtype and --kv-dtype default to None: resolve_device_dtypes()
    picks the CPU runtime's fp32 or the GPU engine's bf16."""
    if device:
        parser.add_argument("--device", default="cpu", type=device_name, metavar="{cpu,cuda,cuda:N}",
                            help="cpu = the C++ runtime; cuda = the GPU engine (torch + Triton kernels, dtypes "
                                 "fp32/bf16/int8, KV cache fp32/bf16) (default: %(default)s)")
        default = None
    shown = "fp32 on the CPU, bf16 with --device cuda" if default is None else "%(default)s"
    parser.add_argument("--dtype", choices=DTYPES, default=default,
                        help="weight format; int4 = 32-weight blocks with an fp16 scale and minimum "
                             f"(default: {shown})")
    parser.add_argument("--lm-head-dtype", choices=LM_HEAD_DTYPES, default="auto",
                        help="format of the LM head (the output projection, read every token); 'same' = "
                             "--dtype; 'auto' = int8 under --dtype int4, else --dtype (default: %(default)s)")
    if kv:
        kv_shown = ("fp32 on the CPU; with --device cuda fp32 under --dtype fp32, else bf16" if device
                    else "%(default)s")
        parser.add_argument("--kv-dtype", choices=KV_DTYPES, default=None if device else "fp32",
                            help="KV-cache format: f16/bf16 half the bytes of fp32, int8 a quarter plus a scale "
                                 f"per row (default: {kv_shown})")


def device_name(value: str) -> str:
    """An argparse type: cpu, cuda or cuda:N (whether that device is usable is checked later)."""
    import re

    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", value):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")
    return value


def resolve_device_dtypes(args) -> dict:
    """The engine keywords for --device/--dtype/--kv-dtype (add_dtype_arguments(device=True)): the
    device checked first, so `--device cuda` without a usable GPU is one error line before any
    loading (DeviceUnavailableError: exit code 2); on the CPU the defaults are fp32."""
    options = {"device": args.device}
    if args.device != "cpu":
        from shortrt.devices import resolve_device

        resolve_device(args.device)
    else:
        options.update(dtype="fp32", kv_dtype="fp32")
    if args.dtype is not None:
        options["dtype"] = args.dtype
    if getattr(args, "kv_dtype", None) is not None:
        options["kv_dtype"] = args.kv_dtype
    return options


def add_device_argument(parser, what: str) -> None:
    """--device, as calibrate, replace and heal take it (checked by shortrt.devices before loading)."""
    parser.add_argument("--device", default="cpu", type=device_name, metavar="{cpu,cuda,cuda:N}",
                        help=f"where {what} runs: cpu, cuda or cuda:N (on a GPU the frozen model is bf16) "
                             "(default: %(default)s)")


def integer(lo: int = 0, hi: int = INT32_MAX):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value
    return parse


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False):
    """An argparse type: a finite float in [lo, hi] (or (lo, hi] with lo_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
            left = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{lo:g}, {hi:g}], got {text}")
        return value
    return parse


def text(value: str) -> str:
    """An argparse type: text that is valid UTF-8 (Python keeps undecodable argv bytes as surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return value


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
MAX_SIZE = 2**62


def size(text_value: str) -> int:
    """An argparse type: a positive number of bytes, plain or with a unit: 100M, 1.5G, 200MiB.

    k/M/G/T (with or without a trailing B) are powers of 1000; KiB/MiB/GiB/TiB (or Ki, Mi, ...)
    powers of 1024; the case of the letters does not matter. The result is a whole number of bytes.
    """
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]{1,3})?)\s*([kmgt]i?)?b?\s*", text_value, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size like 100M, 1.5G, 200MiB or a number of bytes, "
                                         f"got {text_value!r}")
    from fractions import Fraction

    value = Fraction(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    if value.denominator != 1:
        raise argparse.ArgumentTypeError(f"{text_value!r} is not a whole number of bytes")
    if not 1 <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be between 1 byte and 2**62 bytes, got {text_value!r}")
    return int(value)


def layer_list(value: str) -> list[int]:
    """An argparse type: comma-separated layer indices like 3,4,5."""
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 3,4,5, got {value!r}") from None


DATA_HELP = ("{what}: 'default' (a mix of five Jane Austen novels and BoolQ's Wikipedia passages; never "
             "Persuasion or SciQ, the held-out sets), or one or more .txt / .jsonl files (a 'text' field per "
             "line) or directories of them")


def add_data_argument(parser, what: str) -> None:
    """--data PATH [PATH ...] or 'default', for every command that reads text (calibrate, replace, heal)."""
    parser.add_argument("--data", nargs="+", type=text, default=["default"], metavar="PATH",
                        help=DATA_HELP.format(what=what))


def data_source(values: list[str]):
    """What shortrt.data.calibration_texts takes for --data's values: 'default' or a list of Paths."""
    from pathlib import Path

    if values == ["default"]:
        return "default"
    if "default" in values:
        raise ValueError("--data: 'default' cannot be combined with files")
    return [Path(v) for v in values]
