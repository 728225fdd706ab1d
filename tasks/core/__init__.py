"""The machinery every stage uses: files, params, layout, the stage list and runner, MLflow tracking,
parallel maps, and what the training stages share."""
