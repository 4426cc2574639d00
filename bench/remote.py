"""`--url`: load-test a running deployment before a sale, with the same scenarios and reports.

Nothing is started and nothing is seeded: the customer tokens come from --token / --tokens-file / --token-command,
the products from --product (create, flash), --soldout-product and --spread-product. --max-orders is required:
every POST counts against it as wrk builds it (in-flight ones included), over all runs and warm-ups, so the
deployment never gets more orders than that. The correctness check needs the database and is skipped.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench import stack


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load test of a running deployment (--url)")
    g.add_argument("--url", help="base URL of a running deployment, e.g. https://shop.example.com: no local servers")
    g.add_argument("--token", action="append", default=[], help="a customer bearer token (repeatable)")
    g.add_argument("--tokens-file", help="a file with one customer bearer token per line")
    g.add_argument("--token-command",
                   help="a command that prints customer bearer tokens, one per line (run once, before the load)")
    g.add_argument("--product", help="product id of the create and flash scenarios")
    g.add_argument("--soldout-product", help="product id of the soldout scenario (one with no stock left)")
    g.add_argument("--spread-product", action="append", default=[],
                   help="product ids of the spread scenario (repeatable, or comma-separated)")


def check_options(p: argparse.ArgumentParser, args: argparse.Namespace, *, allowed: list[str]) -> None:
    args.url = args.url.rstrip("/")
    if args.max_orders is None:
        p.error("--url needs --max-orders: the most orders this load test may create in the deployment")
    if not (args.token or args.tokens_file or args.token_command):
        p.error("--url needs customer tokens: --token, --tokens-file or --token-command")
    args.spread_product = [x for item in args.spread_product for x in item.split(",") if x]
    given = {"create": args.product, "flash": args.product, "soldout": args.soldout_product,
             "spread": args.spread_product}
    if args.scenarios is None:
        args.scenarios = [s for s in ("create", "soldout", "spread") if given[s]]
    else:
        args.scenarios = [s for s in args.scenarios.split(",") if s]
    for s in args.scenarios:
        if s not in allowed:
            p.error(f"--url runs {', '.join(allowed)}; {s} needs local servers (or the database)")
        if not given[s]:
            p.error(f"scenario {s} needs its product: "
                    f"{'--product' if s in ('create', 'flash') else '--' + s + '-product'}")
    if not args.scenarios:
        p.error("--url: name a product (--product, --soldout-product or --spread-product)")


@dataclass(frozen=True)
class RemoteSeed:
    seed: stack.Seed
    tokens: list[str]


def seed(args: argparse.Namespace, *, folder: Path) -> RemoteSeed:
    tokens = list(args.token)
    if args.tokens_file:
        tokens += [t.strip() for t in Path(args.tokens_file).read_text().splitlines() if t.strip()]
    if args.token_command:
        printed = subprocess.run(shlex.split(args.token_command), capture_output=True, text=True, check=True)
        tokens += [t.strip() for t in printed.stdout.splitlines() if t.strip()]
    if not tokens:
        raise SystemExit("no customer token: --token, --tokens-file and --token-command gave none")
    hot = folder / "hot.txt"
    files = {"create": hot, "flash": hot, "soldout": folder / "sold.txt", "spread": folder / "spread.txt"}
    if args.product:
        stack.write_lines(hot, [args.product])
    if args.soldout_product:
        stack.write_lines(files["soldout"], [args.soldout_product])
    if args.spread_product:
        stack.write_lines(files["spread"], args.spread_product)
    s = stack.Seed(hot=args.product or "", sold_out=args.soldout_product or "", spread=args.spread_product,
                   tokens_file=stack.write_lines(folder / "tokens.txt", tokens), files=files)
    return RemoteSeed(s, tokens)
