"""`python -m bridge` is the same as the `pms-bridge` command."""

from bridge.cli import main

raise SystemExit(main())
