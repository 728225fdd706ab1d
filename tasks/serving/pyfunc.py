"""The MLflow pyfunc text generator, logged as "models from code": MLflow stores this file with the
model and runs it on load, and `set_model` below names the model. tasks/serving/registry.py logs it.

    model = mlflow.pyfunc.load_model("models:/llmpipe@champion")
    model.predict(["The movie was full of", "ROMEO."], params={"max_new_tokens": 20, "strategy": "beam"})
    # → DataFrame: prompt, text, finish_reason, new_tokens, mean_token_p

`mlflow models serve -m models:/llmpipe@champion --env-manager local` answers the same as JSON on
/invocations ({"inputs": ["..."], "params": {...}}). The model's artifacts are `base` (config.json,
model.safetensors, tokenizer) and, for an adapted model, `adapter` (peft's format); its code is model/
(shipped with it), so loading needs torch, tokenizers and safetensors (+ peft with an adapter), not llmpipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


def prompts_of(model_input: pd.DataFrame) -> list[str]:
    """The prompts: the `prompt` column, else the first (a list of strings becomes column 0)."""
    column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
    return [str(value) for value in model_input[column]]


class TextGenerator(PythonModel):
    """llmpipe's GPT (+ LoRA adapter) and tokenizer as a pyfunc: prompts in, generated text out."""

    def load_context(self, context: Any) -> None:
        import torch

        from model.textgen import load_generator

        adapter = context.artifacts.get("adapter")
        self.generator = load_generator(
            Path(context.artifacts["base"]),
            adapter=Path(adapter) if adapter else None,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )

    # A DataFrame hint is one MLflow infers no signature from (the logged one is explicit): every input
    # (a list of prompts, a string, JSON from `mlflow models serve`) arrives as a DataFrame, and params
    # arrive completed with the signature's defaults.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from model.generate import GenerationConfig

        settings = dict(params or {})  # MLflow fills in the signature's defaults (tasks/serving/registry.py)
        settings["stop"] = tuple(settings.get("stop") or ())
        config = GenerationConfig(**settings)
        config.validate()
        prompts = prompts_of(model_input)
        results = self.generator.generate_batch(prompts, config)
        return pd.DataFrame(
            {
                "prompt": prompts,
                "text": [result.text for result in results],
                "finish_reason": [result.finish_reason for result in results],
                "new_tokens": [len(result.ids) for result in results],
                # 0.0 when nothing was generated (a stop string at once): JSON has no NaN
                "mean_token_p": [
                    sum(s.prob for s in result.steps) / len(result.steps) if result.steps else 0.0
                    for result in results
                ],
            }
        )


mlflow.models.set_model(TextGenerator())
