"""The `jaxrm` command line. Each subcommand is a small function over the library."""

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from jaxrm.data import codepmp_pairs, polar_triples, prefixes, toy
from jaxrm.demo import add_command as add_demo_command
from jaxrm.errors import UserError
from jaxrm.generate import codepmp, comment_augment, polar_pool
from jaxrm.generate.lm_server import add_command as add_serve_lm_command
from jaxrm.generate.trajectories import add_command as add_generate_command
from jaxrm.scoring.evaluate import add_commands as add_eval_commands
from jaxrm.scoring.salience import add_command as add_salience_command
from jaxrm.scoring.scorer import add_command as add_score_command
from jaxrm.scoring.server import add_command as add_serve_command
from jaxrm.storage import add_compile_cache_option, use_compile_cache
from jaxrm.tpu.compile_check import add_command as add_compile_check_command
from jaxrm.train.distributed import add_options as add_distributed_options
from jaxrm.train.host_memory import keep_freed_memory
from jaxrm.train.metrics import add_command as add_plot_command
from jaxrm.train.scaling import add_command as add_scaling_command

if TYPE_CHECKING:
    from jaxrm.config import Config

Command = Callable[[argparse.Namespace], None]


def cmd_config(args: argparse.Namespace) -> None:
    from jaxrm.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")


def cmd_train(args: argparse.Namespace) -> None:
    from jaxrm.config import load_config
    from jaxrm.train.distributed import initialize
    from jaxrm.train.loop import Stopped, train

    initialize(args.coordinator, args.num_processes, args.process_id)
    config = load_config(args.config, args.overrides)
    use_compile_cache(args.compile_cache)
    try:
        summary = train(config)
    except Stopped as e:
        print(f"jaxrm: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    shown = {k: round(v, 4) for k, v in summary.items() if k != "step"}
    print(f"trained to step {summary['step']} in {config.output_dir}: {shown}")


def cmd_presets(args: argparse.Namespace) -> None:
    from jaxrm.config import load_config
    from jaxrm.model.decoder import count_params
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


def cmd_import(args: argparse.Namespace) -> None:
    from jaxrm.checkpoint.items import save_model
    from jaxrm.hf.convert import load_hf
    from jaxrm.storage import require_new_dir

    require_new_dir(args.out_checkpoint, "checkpoint path")
    loaded = load_hf(
        args.hf_dir,
        head=args.head,
        keep_lm_head=args.keep_lm_head,
        preset=args.preset,
        seed=args.seed,
    )
    path = save_model(args.out_checkpoint, loaded.model, loaded.config, loaded.tokenizer_dir)
    model = loaded.config.model
    print(
        f"imported {args.hf_dir} -> {path} ({model.num_layers} layers, hidden {model.hidden_size}, "
        f"LM head {'kept' if model.lm_head else 'not kept'})"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from jaxrm.checkpoint.loading import load_model
    from jaxrm.hf.convert import export_hf
    from jaxrm.scoring.scorer import Scorer, reward_statistics
    from jaxrm.sharding import make_mesh
    from jaxrm.storage import require_new_dir

    require_new_dir(args.out_dir, "export directory")
    mesh = make_mesh(fsdp=-1)
    loaded = load_model(args.checkpoint, mesh)
    stats = None
    if args.calibrate:
        stats = reward_statistics(Scorer(loaded, mesh), args.calibrate)
        print(f"rewards on {stats['rows']} rows: mean {stats['mean']:.6g}, std {stats['std']:.6g}")
    out = export_hf(
        loaded,
        args.out_dir,
        arch=args.arch,
        dtype=args.dtype,
        causal_lm=args.causal_lm,
        reward_stats=stats,
    )
    print(f"exported {args.checkpoint} -> {out}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from jaxrm.config import load_config
    from jaxrm.data.prepare import prepare

    config = load_config(args.config, args.overrides)
    spec = args.data or _data_spec(config, args.split)
    if args.runner != "local":
        from jaxrm.data.beam_prepare import prepare_with_beam

        manifest = prepare_with_beam(
            config,
            spec,
            args.out,
            runner=args.runner,
            pipeline_args=args.pipeline_options,
            shard_size=args.shard_size,
        )
    elif args.pipeline_options:
        raise UserError(
            f"{' '.join(args.pipeline_options)}: Beam pipeline options need --runner beam (or "
            "a Beam runner's name)"
        )
    else:
        manifest = prepare(config, spec, args.out, shard_size=args.shard_size)
    print(
        f"prepared {manifest['examples']} examples ({manifest['tokens']} tokens) in "
        f"{len(manifest['shards'])} shards -> {args.out}; skipped rows: {manifest['skipped_rows']}"
    )


def cmd_data_stats(args: argparse.Namespace) -> None:
    import json

    from jaxrm.config import load_config
    from jaxrm.data.prepare import format_stats, stats

    config = load_config(args.config, args.overrides)
    report = stats(config, args.data or _data_spec(config, args.split))
    print(json.dumps(report, indent=2) if args.json else format_stats(report))


def _data_spec(config: "Config", split: str) -> str | list[str]:
    spec = getattr(config.data, split)
    if spec is None:
        raise UserError(f"data.{split} is not set; give --data PATH or set data.{split}")
    return spec


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

    train = commands.add_parser(
        "train",
        help="train a reward model, or resume the run in output_dir",
        description="Train with the config's objective (polar, pairwise, codepmp). When "
        "output_dir already holds checkpoints, the run resumes from the newest one. SIGTERM "
        "and SIGINT save a checkpoint before stopping. On several hosts, run the same command "
        "on each.",
    )
    train.add_argument("config", metavar="CONFIG.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    add_distributed_options(train)
    add_compile_cache_option(train)
    train.set_defaults(run=cmd_train)

    presets = commands.add_parser(
        "presets",
        help="list model presets with their parameter counts",
        description="List the model presets; parameter counts are computed from shapes alone.",
    )
    presets.set_defaults(run=cmd_presets)

    imp = commands.add_parser(
        "import",
        help="convert a Hugging Face model into a jaxrm checkpoint",
        description="Read a Hugging Face Llama / Qwen2 / InternLM2 causal LM or reward model "
        "(safetensors, single or sharded; .bin only through torch's safe loader) into a new "
        "jaxrm checkpoint. Tensors stream one parameter at a time into their sharding.",
    )
    imp.add_argument("hf_dir", metavar="HF_DIR")
    imp.add_argument("out_checkpoint", metavar="OUT_CHECKPOINT")
    imp.add_argument("--preset", help="check that the model has this preset's shape and record it")
    imp.add_argument(
        "--head",
        choices=["zero", "normal"],
        default="zero",
        help="reward head for a base LM: zero (POLAR) or normal std 0.02 (CodePMP)",
    )
    imp.add_argument("--keep-lm-head", action="store_true", help="keep the LM head (CodePMP)")
    imp.add_argument("--seed", type=int, default=0, help="seed of a normal head")
    imp.set_defaults(run=cmd_import)

    exp = commands.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model",
        description="Write CHECKPOINT as a Hugging Face reward model (llama, qwen2: "
        "*ForSequenceClassification; internlm2: POLAR's InternLM2ForRewardModel layout), or with "
        "--causal-lm its LM head as a causal LM.",
    )
    exp.add_argument("checkpoint", metavar="CHECKPOINT")
    exp.add_argument("out_dir", metavar="OUT_DIR")
    exp.add_argument(
        "--arch",
        choices=["llama", "qwen2", "internlm2"],
        help="default: qwen2 for models with q/k/v biases, else llama",
    )
    exp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    exp.add_argument("--causal-lm", action="store_true", help="export the LM head as a causal LM")
    exp.add_argument(
        "--calibrate",
        metavar="ROWS",
        help="scoring rows {prompt, reference?, response}: write the mean and std of their "
        "rewards into config.json (OpenRLHF's normalize_reward, mean, std)",
    )
    exp.set_defaults(run=cmd_export)

    data = commands.add_parser(
        "data",
        help="build, tokenise and inspect datasets",
        description="Build datasets (POLAR triples, CodePMP pairs), tokenise them ahead of time "
        "and measure them.",
    )
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    for name, run, help_text, description in (
        (
            "prepare",
            cmd_data_prepare,
            "tokenise rows into ArrayRecord shards that data.train can name",
            "Apply the config's template and tokenizer to every row and write the examples as "
            "ArrayRecord shards with a manifest; data.train may then name the directory.",
        ),
        (
            "stats",
            cmd_data_stats,
            "length histogram, token counts, packing efficiency, shared-prefix savings",
            "Template every row as the config would and report sequence lengths, token counts, "
            "packing efficiency with and without shared prefixes, and the tokens they save.",
        ),
    ):
        sub = data_commands.add_parser(name, help=help_text, description=description)
        sub.add_argument("config", metavar="CONFIG.yaml")
        sub.add_argument("overrides", nargs="*", metavar="key=value")
        sub.add_argument("--data", help="rows to read (default: the config's data.train)")
        sub.add_argument("--split", choices=["train", "eval"], default="train")
        sub.set_defaults(run=run)
        if name == "prepare":
            sub.add_argument("--out", required=True, help="new directory for the shards")
            sub.add_argument("--shard-size", type=int, default=100_000, help="examples per shard")
            sub.add_argument(
                "--runner",
                default="local",
                help="local (this process, and data.num_workers processes), beam (an Apache "
                "Beam pipeline on 2 local worker processes, Beam's FnApiRunner) or a Beam "
                "runner's name (DataflowRunner, ...); Beam pipeline options (--name=value) may "
                "follow",
            )
            sub.set_defaults(pipeline_options=[])
        else:
            sub.add_argument("--json", action="store_true", help="print the report as JSON")
    for module in (
        polar_triples,
        codepmp_pairs,
        toy,
        prefixes,
        polar_pool,
        codepmp,
        comment_augment,
    ):
        module.add_command(data_commands)
    add_eval_commands(commands)
    add_score_command(commands)
    add_serve_command(commands)
    add_serve_lm_command(commands)
    add_generate_command(commands)
    add_plot_command(commands)
    add_scaling_command(commands)
    add_salience_command(commands)
    add_compile_check_command(commands)
    add_demo_command(commands)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with `key=value` overrides anywhere after the command's positional
    arguments (argparse alone takes them only before the first option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(_is_override(x) for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra and hasattr(args, "pipeline_options"):  # data prepare: for Beam, unchanged
        args.overrides = [*args.overrides, *filter(_is_override, extra)]
        args.pipeline_options = [x for x in extra if not _is_override(x)]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    try:
        args.run(args)
    except UserError as e:
        print(f"jaxrm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxrm: interrupted", file=sys.stderr)
        return 130
    return 0


def _is_override(argument: str) -> bool:
    return not argument.startswith("-") and "=" in argument


if __name__ == "__main__":
    sys.exit(main())
