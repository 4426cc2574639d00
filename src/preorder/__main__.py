"""`python -m preorder ...`: the same as the `preorder` command (how `serve` starts its relay process)."""

from preorder.cli import main

raise SystemExit(main())
