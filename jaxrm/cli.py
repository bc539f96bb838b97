"""The `jaxrm` command line. Each subcommand is a small function over the library."""

import argparse
import sys
from collections.abc import Callable, Sequence

from jaxrm.errors import UserError

Command = Callable[[argparse.Namespace], None]


def cmd_config(args: argparse.Namespace) -> None:
    from jaxrm.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")


def cmd_presets(args: argparse.Namespace) -> None:
    from jaxrm.config import load_config
    from jaxrm.model import count_params
    from jaxrm.presets import PRESETS

    print(
        f"{'preset':<18}{'layers':>7}{'hidden':>8}{'heads':>7}{'kv':>4}{'vocab':>8}"
        f"{'reward model':>15}{'with LM head':>15}{'published':>11}"
    )
    for name, shape in PRESETS.items():
        model = load_config(None, [f"model.preset={name}"]).model
        with_lm = load_config(None, [f"model.preset={name}", "model.lm_head=true"]).model
        published = shape.get("published_params")
        print(
            f"{name:<18}{model.num_layers:>7}{model.hidden_size:>8}{model.num_heads:>7}"
            f"{model.num_kv_heads:>4}{model.vocab_size:>8}{_billions(count_params(model)):>15}"
            f"{_billions(count_params(with_lm)):>15}"
            f"{_billions(published) if published else '-':>11}"
        )


def _billions(count: float) -> str:
    return f"{count / 1e9:.3f}B" if count >= 1e8 else f"{count / 1e6:.3f}M"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxrm", description="Reward-model pre-training and fine-tuning in JAX."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser(
        "config",
        help="print the resolved, validated config",
        description="Resolve CONFIG (with its base: parents and key=value overrides), "
        "validate every key and print the result as YAML.",
    )
    config.add_argument("config", metavar="CONFIG.yaml")
    config.add_argument("overrides", nargs="*", metavar="key=value")
    config.set_defaults(run=cmd_config)

    presets = commands.add_parser(
        "presets",
        help="list model presets with their parameter counts",
        description="List the model presets; parameter counts are computed from shapes alone.",
    )
    presets.set_defaults(run=cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"jaxrm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxrm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
