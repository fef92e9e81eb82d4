"""The command line every training script shares: ``--config FILE --output-dir DIR [--resume] key.sub=value ...``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TypeVar

from common.config import ConfigError, load_config
from common.errors import debug_requested, is_main_process

T = TypeVar("T")

__all__ = ["training_parser", "parse_training_args"]


def training_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted keys of the YAML config, e.g. optim.lr=0.01 data.batch_size=8 "
               "trainer.max_steps=100. Unknown keys and wrong types are refused before any work starts.",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--output-dir", required=True, help="run directory (created; holds config.yaml, "
                        "metrics.jsonl, metrics.json, tb/, checkpoints/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --output-dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an --output-dir that holds a run (its metrics, logs and checkpoints go)")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of input errors (also EOSEG_DEBUG=1)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU exists")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def parse_training_args(cls: type[T], parser: argparse.ArgumentParser,
                        argv: Sequence[str] | None = None) -> tuple[T, argparse.Namespace]:
    """Parse the command line and load the config; a config error exits with status 2 and one clear message."""
    args = parser.parse_intermixed_args(argv)  # key=value overrides may stand before or after the flags
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as exc:
        if args.debug or debug_requested([]):
            raise
        if is_main_process():
            print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, args
