"""`tok generate`: class-conditional samples of a generator, decoded through its tokenizer into PNGs."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tokcli.cli.common import DeviceOpt, QuietOpt, cli_errors, err


def _interval(text: str | None) -> list[float] | None:
    from tokcli.errors import TokUsageError

    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise TokUsageError(f"--guidance-interval takes LOW,HIGH (e.g. 0,0.7), got {text!r}") from None
    return [low, high]


def _per_subtoken(text: str | None, option: str, cast=float):
    """``1.5`` -> 1.5, ``1.75,1.8,2,2`` -> a list (the AR generator's per-sub-token settings)."""
    from tokcli.errors import TokUsageError

    if text is None:
        return None
    try:
        vals = [cast(v) for v in text.split(",")]
    except ValueError:
        raise TokUsageError(f"{option} takes a number or a comma list (one per sub-token), got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


ClassOpt = Annotated[Optional[str], typer.Option("--class", help="class ids: 207, a comma list 1,2,3, or all")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="sampling steps [default: the generator's]")]
CfgOpt = Annotated[Optional[str], typer.Option("--cfg", help="classifier-free guidance scale (1 = none); the AR "
                                                             "generator takes one per sub-token too (1.75,1.8,2,2) "
                                                             "[default: the generator's]")]
IntervalOpt = Annotated[Optional[str], typer.Option("--guidance-interval", metavar="LOW,HIGH",
                                                    help="guide only at times t in [LOW, HIGH] (t = 1 is noise) "
                                                         "[default: the generator's]")]
SamplerOpt = Annotated[Optional[str], typer.Option("--sampler", help="ode | sde [default: the generator's]")]
PathTypeOpt = Annotated[Optional[str], typer.Option("--path-type", help="linear | cosine: the SDE's score "
                                                                        "conversion [default: the generator's]")]
TemperatureOpt = Annotated[Optional[str], typer.Option("--temperature", help="AR: softmax temperature, one value "
                                                                             "or one per sub-token [default: the "
                                                                             "generator's]")]
TopKOpt = Annotated[Optional[str], typer.Option("--top-k", help="AR: keep the k most likely tokens (0 = off, 1 = "
                                                                "greedy), one value or one per sub-token")]
TopPOpt = Annotated[Optional[str], typer.Option("--top-p", help="AR: nucleus filtering (1 = off), one value or one "
                                                                "per sub-token")]
GenSeedOpt = Annotated[int, typer.Option("--seed", help="sample j of the run is seeded with seed + j")]
TokenizerOpt = Annotated[Optional[str], typer.Option("--tokenizer", help="decode through this tokenizer instead of "
                                                                         "the one the generator names")]


def sampler_options(steps, cfg, guidance_interval, sampler, path_type, temperature, top_k, top_p) -> dict:
    """The sampler keywords given on the command line (None = the generator's default), parsed."""
    from tokcli.errors import TokUsageError

    if steps is not None and steps < 1:
        raise TokUsageError(f"--steps must be at least 1, got {steps}")
    options = {"steps": steps, "cfg": _per_subtoken(cfg, "--cfg"),
               "guidance_interval": _interval(guidance_interval), "sampler": sampler, "path_type": path_type,
               "temperature": _per_subtoken(temperature, "--temperature"),
               "top_k": _per_subtoken(top_k, "--top-k", int), "top_p": _per_subtoken(top_p, "--top-p")}
    return {k: v for k, v in options.items() if v is not None}


def generate_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="generator: registry name (sit-xl_softvq-b-64), "
                                                             "local-dir:PATH or a generator folder")],
    output: Annotated[str, typer.Option("--output", "-o", help="folder for the PNGs (class{c:04d}/{i:05d}.png)")],
    classes: ClassOpt = None,
    n: Annotated[int, typer.Option("-n", help="samples per class")] = 1,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    guidance_interval: IntervalOpt = None,
    sampler: SamplerOpt = None,
    path_type: PathTypeOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: GenSeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="samples per batch")] = 8,
    tokens_out: Annotated[Optional[str], typer.Option("--tokens-out", help="also write the tokens (.npz, with "
                                                                           "labels; tok decode reads it)")] = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
):
    """Sample images of the given classes with a generator and decode them through its tokenizer (torchrun
    --nproc_per_node=N -m tokcli generate ... shards the samples; the PNGs are those of one process)."""
    with cli_errors():
        from tokcli.core.distributed import dist_env
        from tokcli.gen import generate as gen_lib

        if n < 1:
            gen_lib.plan([], n)  # the one-line refusal of -n 0
        options = sampler_options(steps, cfg, guidance_interval, sampler, path_type, temperature, top_k, top_p)
        res, gen, tok = gen_lib.run(model, output, classes=classes, n=n, sampler=options, seed=seed,
                                    batch_size=batch_size, tokens_out=tokens_out, tokenizer=tokenizer, device=device,
                                    quiet=quiet)
        if dist_env()[0] == 0:
            err(f"generated {len(res.keys)} image(s) with {gen.name} (decoded by {tok.name}) -> {output}"
                + (f"; tokens -> {tokens_out}" if tokens_out else ""))
