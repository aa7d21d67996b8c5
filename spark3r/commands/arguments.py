"""What every spark3r command shares: runtime options, device/dtype resolution, and the exit-code contract.

Exit codes: 0 done; 2 bad input or usage (one sentence on stderr, no traceback); 1 a bug.
"""
from __future__ import annotations

import argparse
import functools
import sys
import warnings
from typing import Callable

import torch

from spark3r.errors import ParameterError, Spark3rError, Spark3rWarning
from spark3r.models.base import HEAD_DTYPES
from spark3r.models.loading import checked_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with our exit code 2 and a one-line message for usage errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if present)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="compute dtype; auto = bf16 on CUDA with compute capability >= 8, else fp32")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def add_compile_arg(parser: argparse.ArgumentParser) -> None:
    """`--compile`: the commands that load a model for inference pass it to `load_model(compiled=...)`."""
    parser.add_argument("--compile", action="store_true",
                        help="run the blocks and DPT heads through torch.compile: faster on a GPU (the README's speed "
                             "table), but the first forward at each new clip length compiles")


def add_head_dtype_arg(parser: argparse.ArgumentParser) -> None:
    """`--head-dtype`: the commands that load a model for inference pass it to `load_model(head_dtype=...)`."""
    parser.add_argument("--head-dtype", default="fp32", choices=HEAD_DTYPES,
                        help="dtype the dense heads run in: fp32 (as upstream) or compute (the --dtype the trunk runs "
                             "in; opt-in: faster on a GPU, but the outputs move beyond the bf16 trunk's own noise, "
                             "benchmarks/results/block-profile-*.md; camera heads stay fp32) (default: %(default)s)")


def resolve_device(name: str) -> torch.device:
    """`--device`: auto (cuda if present, else cpu) or a device name that `checked_device` accepts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return checked_device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


def flag_of(parameter: str, flags: dict[str, str]) -> str:
    """The command-line flag of a library parameter: flags[parameter], else --name-with-dashes."""
    return flags.get(parameter, "--" + parameter.replace("_", "-"))


def error_message(error: Spark3rError, flags: dict[str, str]) -> str:
    """The sentence a command prints for `error`: a ParameterError names the command's flags."""
    if isinstance(error, ParameterError):
        return error.naming({parameter: flag_of(parameter, flags) for parameter in error.parameters})
    return str(error)


def command(main: Callable[[list[str] | None], int | None] | None = None, *,
            flags: dict[str, str] | None = None):
    """Wrap a console-script entry point: Spark3rError -> one line on stderr and exit code 2; a Spark3rWarning ->
    one "warning: ..." line on stderr.

    `flags` maps library parameters to this command's flags where the flag is not --parameter-with-dashes.
    Use as `@command` or `@command(flags={...})`.
    """
    if main is None:
        return functools.partial(command, flags=flags)
    flags = flags or {}

    @functools.wraps(main)
    def wrapped(argv: list[str] | None = None) -> int:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _print_warning
                return main(argv) or 0
        except Spark3rError as error:
            print(f"error: {error_message(error, flags)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume", file=sys.stderr)
            return 130

    return wrapped


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, Spark3rWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
