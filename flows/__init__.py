"""How llmpipe is driven: the CLI and the Prefect pipeline flow."""
