"""The machinery every stage uses: files, params, layout, the stage runner, MLflow tracking, parallel maps."""
