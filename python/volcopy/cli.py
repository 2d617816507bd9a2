"""The volcopy command: copy, digest and verify volumes from the shell.

Errors are one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

from . import copier
from .digest import digest, verify
from .errors import Cancelled, CheckpointError, VerifyError, VolcopyError
from .progress_bar import ProgressBar
from .units import format_size, parse_size

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's help formatter, given the terminal's width as shutil.get_terminal_size finds it: left
    to ask, argparse imports shutil (and bz2 and lzma with it), 4 ms of a short copy's start-up."""
    columns = os.environ.get("COLUMNS", "")
    if not columns.isdigit():
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 80
    return argparse.HelpFormatter(prog, width=int(columns) - 2)


def _add_copy(commands) -> None:
    c = commands.add_parser(
        "copy", help="copy SRC to DST", description="Copy a volume (file or block device)."
    )
    c.add_argument("src")
    c.add_argument("dst", help="a block device, or a file (created when missing)")
    c.add_argument("--engine", default="auto", choices=["auto", "io_uring", "aio", "sync", "threads"])
    c.add_argument("--block-size", type=_size, help="request size, a multiple of 1M (default 1M)")
    c.add_argument("--queue-depth", type=int, help=f"blocks in flight (default {copier.DEFAULT_QUEUE_DEPTH})")
    c.add_argument("--length", type=_size, help="bytes to copy (default: all of SRC)")
    c.add_argument("--no-direct", action="store_true", help="go through the page cache")
    c.add_argument("--no-sparse", action="store_true", help="copy every byte as data")
    c.add_argument("--dst-is-zero", action="store_true", help="promise that DST already reads as zeros")
    c.add_argument("--verify", action="store_true", help="read DST back and compare digests")
    c.add_argument("--rate", type=_size, help="bytes per second, e.g. 200M")
    c.add_argument("--checkpoint", help="file recording progress, to resume after a crash")
    c.add_argument(
        "--dst-id",
        help="a stable id of DST (e.g. its Cinder volume id): the checkpoint resumes onto it "
        "when it comes back under another device name",
    )
    c.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_digest(commands) -> None:
    d = commands.add_parser("digest", help="print the volume digest of PATH")
    d.add_argument("path")
    d.add_argument("--length", type=_size)


def _add_verify(commands) -> None:
    v = commands.add_parser("verify", help="check that DST reads back as SRC")
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--length", type=_size)


def _add_bench(commands) -> None:
    commands.add_parser(
        "bench", help="compare with dd, qemu-img, nbdcopy, cp and the fio limit (see --help)", add_help=False
    )


def _add_migration(commands) -> None:
    from .migration.commands import add_parsers

    add_parsers(commands, _size)


def _add_movers(commands) -> None:
    from .movers.commands import add_parsers

    add_parsers(commands)


def _add_services(commands) -> None:
    # like compute-agent: oslo.config parses its options (--config-file FILE, oslo.log's)
    commands.add_parser(
        "mover",
        help="run a data mover: join the movers' group with this host's transports, slots and bandwidth "
        "(--config-file FILE; see docs/movers.md)",
    )
    # its options are oslo.config's (--config-file FILE, oslo.log's): it parses them itself
    commands.add_parser(
        "compute-agent",
        help="run the reference compute side of the migration handoff (--config-file FILE; see "
        "docs/compute-agent.md)",
    )


# command -> what adds its parser; in the order `volcopy --help` lists them
_COMMANDS = {
    "copy": _add_copy,
    "digest": _add_digest,
    "verify": _add_verify,
    "bench": _add_bench,
    "migrate": _add_migration,
    "migrations": _add_migration,
    "movers": _add_movers,
    "mover": _add_services,
    "compute-agent": _add_services,
}


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone: building them all (and importing the
    migration's and movers' modules for theirs) was a third of a short copy's start-up."""
    parser = argparse.ArgumentParser(
        prog="volcopy", description="Fast, safe copying of block volumes.", formatter_class=_help_formatter
    )
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        prog="volcopy",  # else argparse builds a default help formatter to find it
        parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_help_formatter),
    )
    adders = [_COMMANDS[command]] if command in _COMMANDS else _COMMANDS.values()
    for add in dict.fromkeys(adders):  # each once: one adds migrate and migrations
        add(commands)
    return parser


def _summary(result: copier.CopyResult, src: str, dst: str) -> str:
    cached = result.bytes_from_cache
    from_cache = f" ({format_size(cached)} from the page cache)" if cached else ""
    rows = [
        ("copied", f"{src} -> {dst}"),
        ("size", format_size(result.size)),
        ("time", f"{result.seconds:.2f} s at {format_size(result.rate)}/s"),
        ("read", format_size(result.bytes_read) + from_cache),
        ("written", format_size(result.bytes_written)),
        ("holes skipped", format_size(result.bytes_skipped)),
        ("zeros detected", format_size(result.bytes_zero)),
        (
            "engine",
            f"{result.engine}, {'O_DIRECT' if result.direct else 'page cache'}, "
            f"{format_size(result.block_size)} x {result.queue_depth}",
        ),
    ]
    if result.resumed_from:
        rows.append(("resumed from", format_size(result.resumed_from)))
    if result.digest:
        rows.append(("digest", result.digest))
    rows.append(("verified", "yes, dst reads back identical" if result.verified else "no (use --verify)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _copy(args: argparse.Namespace) -> int:
    bar = ProgressBar() if sys.stderr.isatty() and not args.json else None
    result = copier.copy(
        args.src,
        args.dst,
        length=args.length,
        engine=args.engine,
        block_size=args.block_size,
        queue_depth=args.queue_depth,
        direct=False if args.no_direct else "auto",
        sparse=not args.no_sparse,
        dst_is_zero=args.dst_is_zero,
        verify=args.verify,
        rate_limit=args.rate,
        checkpoint=args.checkpoint,
        dst_id=args.dst_id,
        progress=bar,
    )
    if bar:
        bar.close()
    if args.json:
        import json

        print(json.dumps(result.as_dict() | {"rate": result.rate}, indent=2))
    else:
        print(_summary(result, args.src, args.dst))
    return 0


def _where_it_resumes(args: argparse.Namespace) -> str:
    """For a copy with a checkpoint: where the same command, run again, starts."""
    checkpoint = getattr(args, "checkpoint", None) if args.command == "copy" else None
    if not checkpoint or not os.path.exists(checkpoint):
        return ""
    from ._core import checkpoint_resume_offset

    offset = checkpoint_resume_offset(checkpoint)
    return f"; the same command resumes at byte {offset} ({format_size(offset)}) from checkpoint {checkpoint}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own options: the harness parses them
        from .bench.compare import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["compute-agent"]:
        from .compute.agent import main as agent_main

        return agent_main(argv[1:])
    if argv[:1] == ["mover"]:
        from .movers.service import main as mover_main

        return mover_main(argv[1:])
    args = _parser(argv[0] if argv else None).parse_args(argv)
    try:
        if args.command == "copy":
            return _copy(args)
        if args.command == "digest":
            print(digest(args.path, length=args.length))
            return 0
        if args.command in ("migrate", "migrations"):
            import logging

            from .migration import commands as migration_commands

            logging.basicConfig(level=logging.ERROR, format="volcopy: %(message)s")
            return getattr(migration_commands, args.command)(args)
        if args.command == "movers":
            from .movers import commands as mover_commands

            return mover_commands.movers(args)
        if args.command == "verify":
            verify(args.src, args.dst, length=args.length)
            print(f"{args.dst} reads back identical to {args.src}")
            return 0
    except KeyboardInterrupt:
        print(f"\nvolcopy: interrupted{_where_it_resumes(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Cancelled as exc:
        print(f"volcopy: {exc}{_where_it_resumes(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except VerifyError as exc:
        print(f"volcopy: verify failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except CheckpointError as exc:
        print(f"volcopy: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (VolcopyError, OSError) as exc:
        print(f"volcopy: error: {exc}{_where_it_resumes(args)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("VOLCOPY_DEBUG"):
            raise
        print(f"volcopy: internal error: {exc!r} (set VOLCOPY_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
