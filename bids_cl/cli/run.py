"""``bids_cl bids_dir output_dir {participant,group}``: validate, discover, run, exit with a BIDS code."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bids_cl import __version__
from bids_cl.config import RunConfig
from bids_cl.errors import (
    EXIT_MISSING_INPUT,
    EXIT_OK,
    BidsClError,
)
from bids_cl.utils.cli import run_command

if TYPE_CHECKING:
    from bids_cl.utils.bids import Discovery

LOGGER = logging.getLogger("bids_cl")


def _setup_logging(verbose: int, log_file: Path) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1
                     else logging.DEBUG)
    if verbose < 2:
        # The console is bids_cl's own voice: Nipype's node tracebacks, pybids' and numpy's warnings
        # belong in the log file, where the one-line error points (-vv shows everything).
        console.addFilter(lambda record: record.name == "bids_cl" or record.name.startswith("bids_cl."))
    logging.captureWarnings(True)
    console.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s",
                                           "%H:%M:%S"))
    root.addHandler(console)
    file_handler = logging.FileHandler(log_file)
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(
        "%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root.addHandler(file_handler)
    # Nipype and friends are chatty: keep their detail in the log file only.
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "bids", "nnunetv2"):
        logging.getLogger(name).setLevel(logging.INFO if verbose < 2 else logging.DEBUG)
    # Nipype adds its own stdout handler on import, which would print every INFO line ("[Node] Setting-up",
    # "[MultiProc] Running") whatever the console level; its records reach the handlers above instead.
    # MultiProc workers are forked after this, so they inherit the same set-up.
    import nipype  # noqa: F401  (the handler is installed on import)

    nipype_logger = logging.getLogger("nipype")
    for handler in list(nipype_logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            nipype_logger.removeHandler(handler)


def _early_log_file() -> Path:
    fd, name = tempfile.mkstemp(prefix="bids_cl-", suffix=".log")
    os.close(fd)
    return Path(name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bids_cl`` console script; returns the process exit code."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no telemetry DNS lookup on offline nodes
    os.environ.setdefault("NO_ET", "1")
    log_file = _early_log_file()
    verbose = sum(a.count("v") for a in (argv or sys.argv[1:]) if a.startswith("-v")
                  or a == "--verbose")
    _setup_logging(verbose, log_file)

    def body() -> int:
        from bids_cl.cli.parser import parse_args

        config = parse_args(argv)
        LOGGER.debug("bids_cl %s, configuration:\n%s", __version__, config.to_toml())
        if config.analysis_level == "group":
            return _run_group(config)
        return _run_participant(config, log_file)

    kept: list[Path] = []

    def crash_log() -> Path:
        kept.append(log_file)
        return log_file

    try:
        return run_command("bids_cl", body, crash_log=crash_log)
    finally:
        # The run's log was copied into each participant's log folder; a temporary is left only when
        # the one-line error points at it (an unexpected failure before any log folder existed).
        logging.shutdown()
        if not kept:
            log_file.unlink(missing_ok=True)


def _plan(config: RunConfig) -> Discovery:
    from bids_cl.utils.bids import (
        check_output_locations,
        discover,
        make_layout,
        validate_dataset,
    )

    check_output_locations(config.bids_dir, config.output_dir,
                           None if config.dry_run else config.work_dir)
    if not config.dry_run:
        from bids_cl.cli.workflow import check_creatable

        check_creatable(config.output_dir, "output directory")
        check_creatable(config.work_dir, "work directory")
    validation = validate_dataset(config.bids_dir, skip=config.skip_bids_validation)
    LOGGER.info("BIDS validation: %s", validation)
    layout = make_layout(config.bids_dir, config.bids_database_dir)
    found = discover(
        layout,
        participant_label=config.participant_label,
        session_label=config.session_label,
        bids_filters=config.bids_filters,
    )
    for record in found.to_dicts():
        LOGGER.info("discovered: %s", json.dumps(record))
    return found


def _run_participant(config: RunConfig, log_file: Path) -> int:
    found = _plan(config)
    if config.dry_run:
        for record in found.to_dicts():
            print(json.dumps(record, sort_keys=False))
        return EXIT_OK

    if not found.items:
        first = found.problems[0]
        raise BidsClError(
            first.problem if len(found.problems) == 1 else
            f"no usable input: {first.problem} (and {len(found.problems) - 1} more problem(s))",
            first.problem_code,
        )
    from bids_cl.cli.workflow import make_output_dir, run_participants

    if config.reports_only:
        from bids_cl.reports import generate_reports

        make_output_dir(config.output_dir)
        generate_reports(config.output_dir,
                         sorted({i.participant for i in [*found.items, *found.problems]}))
        return EXIT_OK

    return run_participants(config, found.items, found.problems, log_file=log_file)


def _run_group(config: RunConfig) -> int:
    if not config.output_dir.is_dir():
        raise BidsClError(
            f"{config.output_dir} does not exist: run the participant level first", EXIT_MISSING_INPUT
        )
    from bids_cl.group import run_group_level

    result = run_group_level(config.bids_dir, config.output_dir,
                             participant_labels=config.participant_label)
    print(f"bids_cl group: {result.summary}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
