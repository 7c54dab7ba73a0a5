"""``bids_cl-models``: list, install, inspect and verify segmentation models.

    bids_cl-models list
    bids_cl-models install molchanova2025                 # Zenodo (lists the record, downloads the zip)
    bids_cl-models install molchanova2025 --from-file model.zip   # offline HPC nodes
    bids_cl-models install synthstrip [--from-file synthstrip.1.pt]   # default: $FREESURFER_HOME's copy
    bids_cl-models info demo | NAME | /path/to/model [--json]
    bids_cl-models verify [NAME ...]                       # re-check the SHA-256 of every file
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bids_cl.engine import registry, store
from bids_cl.engine.lockfile import read_lock_file
from bids_cl.errors import EXIT_BAD_DATA, EXIT_MISSING_INPUT, BidsClError
from bids_cl.utils.cli import UsageParser, run_command

PROG = "bids_cl-models"


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog=PROG, description="Manage bids_cl segmentation models "
                                     f"(stored in ${registry.HOME_ENV}/models, default ~/.cache/bids_cl).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="known and installed models")
    inst = sub.add_parser("install", help="download (or unpack) a model and lock its files")
    inst.add_argument("name", help=f"model name, e.g. {registry.PUBLISHED_MODEL}, or "
                      f"{registry.SYNTHSTRIP} (SynthStrip's weights)")
    inst.add_argument("--from-file", metavar="FILE",
                      help="install from a local archive (nnUNetv2_export_model_to_zip) instead of "
                      f"downloading; for {registry.SYNTHSTRIP}: the {registry.SYNTHSTRIP_WEIGHTS} file")
    inst.add_argument("--file", metavar="NAME", help="which file of the Zenodo record to download "
                      "(needed only when the record holds several zip files)")
    inst.add_argument("--force", action="store_true", help="replace an installed copy")
    inst.add_argument("--allow-unsafe-unpickling", action="store_true",
                      help="DANGEROUS: let this one model's checkpoints be fully unpickled, which runs any "
                      "code they contain. Only for a model you trust whose checkpoints hold objects "
                      "beyond bids_cl's safe allow-list")
    inst.add_argument("--no-progress", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="print a model's provenance")
    info.add_argument("model", help="model name, model folder or export zip")
    info.add_argument("--json", action="store_true", help="machine-readable JSON")
    ver = sub.add_parser("verify", help="re-check installed models against their lock files")
    ver.add_argument("names", nargs="*", help="models to check (default: all installed)")
    return parser


def _cmd_list() -> int:
    rows = registry.list_models()
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['status']:<14}  {row['description']}")
        if row["doi"]:
            print(f"{'':<{width}}  {'':<14}  doi:{row['doi']}")
        print(f"{'':<{width}}  {'':<14}  {row['path']}")
        if row.get("hint"):
            print(f"{'':<{width}}  {'':<14}  {row['hint']}")
    return 0


def _install_synthstrip(args: argparse.Namespace) -> Path:
    from bids_cl.preproc.skullstrip import load_synthstrip_model

    if args.from_file:
        src, source = Path(args.from_file), {"installed_from": "file"}
    else:
        found = registry.freesurfer_synthstrip()
        if found is None:
            raise BidsClError(
                f"no {registry.SYNTHSTRIP_WEIGHTS} to install: bids_cl may not download or ship FreeSurfer's "
                f"SynthStrip weights. Get the file from {registry.SYNTHSTRIP_SOURCES}, then run "
                f"'bids_cl-models install {registry.SYNTHSTRIP} --from-file {registry.SYNTHSTRIP_WEIGHTS}' "
                "(or set FREESURFER_HOME and run it without --from-file)", EXIT_MISSING_INPUT)
        src, source = found, {"installed_from": "FreeSurfer installation"}
    if args.allow_unsafe_unpickling:
        raise BidsClError("--allow-unsafe-unpickling is for segmentation models; SynthStrip's weights are "
                          "plain tensors and always load safely", EXIT_BAD_DATA)
    return store.install_weights_file(registry.SYNTHSTRIP, src, filename=registry.SYNTHSTRIP_WEIGHTS,
                                      check=load_synthstrip_model, source=source, force=args.force)


def _cmd_install(args: argparse.Namespace) -> int:
    args.name = registry.canonical_name(args.name)
    if args.name == registry.SYNTHSTRIP:
        dest = _install_synthstrip(args)
        print(f"installed {args.name} in {dest} (--skull-strip auto now uses SynthStrip)")
        return 0
    if args.from_file:
        spec = registry.REGISTRY.get(args.name)
        source = {"doi": spec.doi, "zenodo_record": spec.zenodo_record} if spec and spec.doi else {}
        source["installed_from"] = "file"
        dest = store.install_from_file(args.name, args.from_file, source=source, force=args.force,
                                       allow_unsafe_unpickling=args.allow_unsafe_unpickling)
    else:
        dest = store.install_from_zenodo(args.name, file=args.file, force=args.force,
                                         progress=not args.no_progress,
                                         allow_unsafe_unpickling=args.allow_unsafe_unpickling)
    origin = store.lock_source(dest).get("origin")
    print(f"installed {args.name} in {dest}" + (f" ({origin})" if origin else ""))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from bids_cl.engine.models import load_model

    if registry.canonical_name(args.model) == registry.SYNTHSTRIP:
        folder = registry.installed_model_dir(registry.SYNTHSTRIP)
        lock = read_lock_file(folder)
        if lock is None:
            raise BidsClError(f"{registry.SYNTHSTRIP} is not installed: "
                              f"{registry.install_command(registry.SYNTHSTRIP)}", EXIT_MISSING_INPUT)
        prov = {"name": registry.SYNTHSTRIP, "path": str(folder),
                "citation": registry.REGISTRY[registry.SYNTHSTRIP].citation,
                "source": lock.get("source"), "files": lock.get("files")}
    else:
        prov = load_model(args.model).provenance
    if args.json:
        print(json.dumps(prov, indent=2, default=str))
        return 0
    for key, value in prov.items():
        if key == "files":
            print("files (SHA-256):")
            for rel, digest in value.items():
                print(f"  {digest}  {rel}")
        elif isinstance(value, (dict, list)):
            print(f"{key}: {json.dumps(value, default=str)}")
        elif value is not None:
            print(f"{key}: {value}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    names = args.names or [r["name"] for r in registry.list_models() if r["status"] == "installed"]
    if not names:
        print("no installed models")
        return 0
    failed = 0
    for name in names:
        folder = registry.installed_model_dir(name)
        problems = store.verify_installed(name)
        if problems:
            failed += 1
            print(f"{name}: FAILED")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(f"{name}: OK ({folder})")
    return EXIT_BAD_DATA if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bids_cl-models``; returns the exit code."""
    return run_command(PROG, lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    if args.command == "list":
        return _cmd_list()
    if args.command == "install":
        return _cmd_install(args)
    if args.command == "info":
        return _cmd_info(args)
    return _cmd_verify(args)


if __name__ == "__main__":
    sys.exit(main())
