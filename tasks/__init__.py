"""What each pipeline stage does: one module per stage at this level (tasks/<stage>.py, the list in
tasks/core/stages.py); the machinery they share in tasks/core/, tasks/data/ and tasks/serving/."""
