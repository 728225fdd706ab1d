"""The maths: pure PyTorch/numpy (GPT, LoRA, decoding, training loop, FLOPs). No Prefect, MLflow or DVC."""
