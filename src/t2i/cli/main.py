"""`t2i` command line: one sub-command per module in t2i.cli, loaded lazily so `t2i info` stays instant.

Errors a user causes end in one stderr line `t2i CMD: error: ...` and exit status 2: every `T2IError`, and
the OS errors of paths the user named (missing, not permitted, a directory, a full disk), which name the path.
Any other exception is a bug in t2i and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from t2i.errors import T2IError

# name -> module; each module defines `register(subparsers)` which adds its parser and sets `func`.
COMMANDS = {
    "sample": "t2i.cli.sample",
    "info": "t2i.cli.info",
    "train": "t2i.cli.train",
    "precache": "t2i.cli.precache",
    "export": "t2i.cli.export",
    "data": "t2i.cli.data",
    "eval": "t2i.cli.eval",
    "demo": "t2i.cli.demo",
    "lora": "t2i.cli.lora",
    "serve": "t2i.cli.serve",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description="Train and run text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = [a for a in argv if a in COMMANDS][:1] or list(COMMANDS)
    for name, module in COMMANDS.items():
        if name in wanted:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=f"see `t2i {name} --help`")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except T2IError as err:
        print(f"t2i {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        message = os_error_message(err)
        if message is None:
            raise
        print(f"t2i {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"t2i {args.command}: interrupted", file=sys.stderr)
        return 130


_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.EROFS,
                errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.ENAMETOOLONG, errno.ELOOP}


def os_error_message(err: OSError) -> str | None:
    """One line for an OS error about a path the user gave ("PATH: No space left on device"), else None."""
    if err.errno not in _USER_ERRNOS or not err.filename:
        return None
    paths = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
    reason = err.strerror or type(err).__name__
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        reason = "no space left on device"
    return f"{paths}: {reason}"


if __name__ == "__main__":
    sys.exit(main())
