"""Allow ``python -m bids_cl``."""

from bids_cl.cli.run import main

if __name__ == "__main__":
    raise SystemExit(main())
