"""The trained model outside the pipeline: the MLflow pyfunc and the registry."""
