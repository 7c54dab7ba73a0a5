"""What every bids_cl command shares: the parser base (usage error = exit 64, one line) and the way a
command ends (one line on stderr and a BIDS-Apps exit code, never a traceback).

Every console script (``bids_cl``, ``bids_cl-models``, ``bids_cl-train``, ``bids_cl-evaluate``,
``bids_cl-synth``, ``bids_cl-demo``, ``bids_cl-slurm``, ``bids_cl-fetch-templates``) builds its parser on
:class:`UsageParser` and runs its body through :func:`run_command`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from bids_cl.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, BidsClError


class UsageParser(argparse.ArgumentParser):
    """argparse whose usage errors raise ``BidsClError(..., EXIT_USAGE)`` instead of exiting with 2.

    The message names ``--help`` of the command (sub-commands name their parent's program), so the one
    line printed by :func:`run_command` tells the user where to look.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        program = self.prog.split()[0]
        raise BidsClError(f"{message} (see {program} --help)", EXIT_USAGE)


def run_command(prog: str, body: Callable[[], int], *,
                crash_log: Callable[[], Path] | None = None) -> int:
    """Run a command's body and turn every way it can end into an exit code.

    ``BidsClError``: its one-line message and code. ``SystemExit`` (``--help``, ``--version``): its code.
    Ctrl-C: 130. Anything else is a bug: one line on stderr, and the traceback appended to the file that
    ``crash_log()`` names when the command keeps a log (never printed as a traceback).
    """
    try:
        return int(body())
    except BidsClError as exc:
        print(f"{prog}: error: {exc.message}", file=sys.stderr)
        return exc.code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last line of defence: a sentence, never a bare traceback
        where = ""
        if crash_log is not None:
            try:
                log_file = crash_log()
                with open(log_file, "a") as handle:
                    traceback.print_exc(file=handle)
                where = f" (details: {log_file})"
            except OSError:
                pass
        print(f"{prog}: error: unexpected {type(exc).__name__}: {exc}{where}", file=sys.stderr)
        return EXIT_FAILURE
