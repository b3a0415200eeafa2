"""`mergekit-ctm` command: merge, validate, inspect, reference.

mergekit-ctm merge RECIPE OUT [mergekit-yaml options]
mergekit-ctm validate RECIPE                 # recipe + every adapter, plan, no tensor math
mergekit-ctm inspect OUT --inputs A1 A2 ...  # per-task energy retention (CtM paper, App. D.1)
mergekit-ctm reference [-o docs/reference.md]
"""

from __future__ import annotations

import click
from mergekit.options import MergeOptions, add_merge_options

import mergekit_ctm
from mergekit_ctm.engine.methods import METHOD_NAMES
from mergekit_ctm.errors import one_line_errors

PROG = "mergekit-ctm"


def _read(recipe: str) -> str:
    from mergekit_ctm.recipe import RecipeError

    try:
        with open(recipe, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {recipe!r} is not UTF-8 text ({exc.reason})") from None


@click.group(help="Merge many PEFT LoRA adapters into one low-rank LoRA (mergekit plugin).")
def main() -> None:
    mergekit_ctm.install()


@main.command(
    "merge",
    help="Merge the adapters (or full fine-tunes) of RECIPE into OUT (same options as "
    "mergekit-yaml).",
)
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path")
@add_merge_options
def merge_cmd(merge_options: MergeOptions, recipe: str, out_path: str) -> None:
    from mergekit_ctm.plan.run import run_adapter_merge

    merge_options.apply_global_options()
    with one_line_errors(PROG):
        text = _read(recipe)
        if _full_checkpoints(text, recipe):
            _merge_full(text, recipe, out_path, merge_options)
            if not merge_options.quiet:
                click.echo(f"wrote {out_path}")
            return
        result = run_adapter_merge(
            text, out_path, merge_options, config_source=text, recipe_path=recipe
        )
    if not merge_options.quiet:
        ranks = result.get("ranks") or {}
        click.echo(f"wrote {out_path}" + (f" ({len(ranks)} modules)" if ranks else ""))


def _full_checkpoints(text: str, recipe: str) -> bool:
    """One of our methods over full checkpoints (mergekit's planner, our kernel per tensor)."""
    from mergekit_ctm.integration.dispatch import is_adapter_recipe
    from mergekit_ctm.recipe.model import load_yaml

    raw = load_yaml(text, recipe)
    return (
        isinstance(raw, dict)
        and raw.get("merge_method") in METHOD_NAMES
        and not is_adapter_recipe(raw)
    )


def _merge_full(text: str, recipe: str, out_path: str, options: MergeOptions) -> None:
    """Exactly what ``mergekit-yaml RECIPE OUT`` does with a full-checkpoint recipe: our recipe
    checks, mergekit's ``MergeConfiguration``, then ``run_merge`` (our dispatch: mergekit's
    planner with our kernel per tensor)."""
    import pydantic
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    from mergekit_ctm.integration.dispatch import check_recipe_text, invalid_recipe
    from mergekit_ctm.recipe.model import load_yaml

    check_recipe_text(text, recipe)
    try:
        config = MergeConfiguration.model_validate(load_yaml(text, recipe))
    except pydantic.ValidationError as exc:
        raise invalid_recipe(recipe, exc) from None
    run_merge(config, out_path, options=options, config_source=text)


@main.command(
    "validate",
    help="Check RECIPE and every input (adapters: every tensor finite; full checkpoints: "
    "tensor names and shapes from their headers); print the plan (no merge math).",
)
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--random-seed", type=int, default=None, help="seed used for per-module seeds")
@click.option(
    "--out-shard-size",
    type=str,
    default="5B",
    show_default=True,
    help="full checkpoints: mergekit-yaml's --out-shard-size (bytes its writer buffers)",
)
def validate_cmd(recipe: str, random_seed: int | None, out_shard_size: str) -> None:
    from mergekit.common import parse_kmb

    from mergekit_ctm.cli.report import describe_full_plan, describe_plan
    from mergekit_ctm.recipe import build_plan
    from mergekit_ctm.recipe.full import build_full_plan
    from mergekit_ctm.recipe.validate import check_tensor_values

    with one_line_errors(PROG):
        text = _read(recipe)
        if _full_checkpoints(text, recipe):
            try:
                shard = int(parse_kmb(out_shard_size))
            except (ValueError, IndexError):
                from mergekit_ctm.recipe import RecipeError

                raise RecipeError(
                    f"--out-shard-size: {out_shard_size!r} is not a size (e.g. 5B, 500M)"
                ) from None
            click.echo(describe_full_plan(build_full_plan(text, recipe, out_shard_size=shard)))
            return
        plan = build_plan(text, random_seed=random_seed)
        check_tensor_values(plan)
        click.echo(describe_plan(plan))


@main.command(
    "inspect",
    help="Per-task energy retention ρ̄(t) of merged adapter OUT (He et al., Compress then "
    "Merge, arXiv:2606.03723, App. D.1).",
    context_settings={"allow_extra_args": True},
)
@click.argument("out_path", type=click.Path(exists=True, file_okay=False))
@click.option("--inputs", "inputs", multiple=True, required=True, help="input adapters (repeat)")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="bar chart PNG")
def inspect_cmd(out_path: str, inputs: tuple[str, ...], plot: str | None) -> None:
    from mergekit_ctm.cli.report import energy_retention, format_retention, plot_retention

    # click's `multiple` needs --inputs before each value; also accept `--inputs A B C`.
    extra = list(click.get_current_context().args)
    with one_line_errors(PROG):
        table = energy_retention(out_path, list(inputs) + extra)
        click.echo(format_retention(table))
        if plot:
            plot_retention(table, plot)
            click.echo(f"wrote {plot}")


@main.command("reference", help="Print (or write) docs/reference.md from the method descriptions.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None)
def reference_cmd(output: str | None) -> None:
    from mergekit_ctm.cli.reference import reference_markdown

    text = reference_markdown()
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)


if __name__ == "__main__":
    main()
