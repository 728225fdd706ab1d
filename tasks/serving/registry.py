"""The MLflow model registry: each evaluate run logs the model as a pyfunc text generator
(tasks/serving/pyfunc.py, "models from code") and registers it as a new version; an alias (`champion`) points
at the version with the lowest bits per byte.

    llmpipe         models/base                   ranked by val_bpb (the general validation split)
    llmpipe-lora    models/base + models/lora     ranked by domain_bpb_lora (the domain validation split)

    mlflow.pyfunc.load_model("models:/llmpipe@champion").predict(["The movie was full of"])
    llmpipe generate --model models:/llmpipe@champion --prompt "..."   (resolve() downloads it)

Each version carries its score as the version tag `<metric>`, so promotion never re-reads runs.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import model as model_package
from model.generate import GenerationConfig
from model.tokens import TOKENIZER_FILE

SERVING_CODE = Path(__file__).with_name("pyfunc.py")
MODEL_CODE = Path(model_package.__file__).parent
#: What the pyfunc needs of models/base (hf/ and the rest stay out of the registry).
BASE_FILES = ("config.json", "model.safetensors", TOKENIZER_FILE, "tokenizer_config.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: predict()'s params: GenerationConfig fields a caller may set, with MLflow's type for each.
PARAM_TYPES = {
    "max_new_tokens": "long",
    "strategy": "string",
    "temperature": "double",
    "top_k": "long",
    "top_p": "double",
    "min_p": "double",
    "repetition_penalty": "double",
    "num_beams": "long",
    "length_penalty": "double",
    "seed": "long",
    "stop": "string",
}
MLFLOW_URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def signature() -> Any:
    """Prompts (strings: a list, or a one-column DataFrame) in; prompt, text, finish_reason, new_tokens,
    mean_token_p out; the generation settings as params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    defaults = GenerationConfig()
    params = []
    for name, dtype in PARAM_TYPES.items():
        default = getattr(defaults, name)
        if name == "stop":
            params.append(ParamSpec(name, dtype, list(default), shape=(-1,)))
        else:
            params.append(ParamSpec(name, dtype, default))
    outputs = [("prompt", "string"), ("text", "string"), ("finish_reason", "string")]
    outputs += [("new_tokens", "long"), ("mean_token_p", "double")]
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec(dtype, name) for name, dtype in outputs]),
        params=ParamSchema(params),
    )


def requirements(with_adapter: bool) -> list[str]:
    """The pyfunc's pip requirements, pinned to what is installed here."""
    names = ["torch", "tokenizers", "safetensors", "numpy", "pandas"]
    if with_adapter:
        names += ["peft", "transformers"]
    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def _stage_files(source: Path, names: tuple[str, ...], destination: Path) -> Path:
    destination.mkdir(parents=True)
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
    return destination


def register(
    name: str, base: Path, adapter: Path | None, metric: str, value: float | None, alias: str
) -> dict[str, Any]:
    """Log the model in the active run as a pyfunc, register it as a new version of `name`, tag the
    version with its score and move `alias` to the best-scoring version. Returns version and champion."""
    import mlflow
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="llmpipe-register-") as tmp:
        artifacts = {"base": str(_stage_files(Path(base), BASE_FILES, Path(tmp) / "base"))}
        if adapter is not None:
            artifacts["adapter"] = str(_stage_files(Path(adapter), ADAPTER_FILES, Path(tmp) / "adapter"))
        info = mlflow.pyfunc.log_model(
            name="generator" if adapter is None else "generator_lora",
            python_model=str(SERVING_CODE),
            artifacts=artifacts,
            code_paths=[str(MODEL_CODE)],
            signature=signature(),
            input_example=(["The movie was full of"], {"max_new_tokens": 4}),  # checked by running it
            pip_requirements=requirements(adapter is not None),
            registered_model_name=name,
        )
    registered = str(info.registered_model_version)
    client = MlflowClient()
    if value is not None and math.isfinite(value):  # a diverged run (NaN) can never be champion
        client.set_model_version_tag(name, registered, metric, str(value))
    client.set_model_version_tag(name, registered, "metric", metric)
    champion = promote_best(name, metric, alias)
    return {"name": name, "version": registered, "champion": champion, "uri": f"models:/{name}/{registered}"}


def promote_best(name: str, metric: str, alias: str) -> str | None:
    """Point `alias` at the version of `name` with the lowest `metric` tag; returns that version."""
    from mlflow import MlflowClient

    client = MlflowClient()
    scored = [
        (float(v.tags[metric]), -int(v.version))
        for v in client.search_model_versions(f"name = '{name}'")
        if metric in v.tags and math.isfinite(float(v.tags[metric]))
    ]
    if not scored:
        return None
    best = str(-min(scored)[1])  # a tie goes to the newer version (the same score, the latest code)
    client.set_registered_model_alias(name, alias, best)
    return best


def is_mlflow_uri(spec: str) -> bool:
    return spec.startswith(MLFLOW_URI_SCHEMES)


def download(uri: str, destination: Path) -> tuple[Path, Path | None]:
    """(checkpoint, adapter) of a logged text generator (models:/NAME@ALIAS, models:/NAME/VERSION,
    runs:/RUN_ID/generator), downloaded into `destination`."""
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination)))
    except mlflow.exceptions.MlflowException as err:  # an unknown name, alias, version or run
        raise FileNotFoundError(f"{uri}: {err.message}") from None
    base, adapter = local / "artifacts" / "base", local / "artifacts" / "adapter"
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{uri}: not an llmpipe text generator (no artifacts/base/config.json)")
    return base, adapter if adapter.is_dir() else None
