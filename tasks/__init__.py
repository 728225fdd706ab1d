"""What each pipeline stage does: one module per stage, plus shared I/O, params and tracking helpers."""
