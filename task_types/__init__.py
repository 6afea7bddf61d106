"""Task types, one module each: found through Settings.task_types, never imported by the engine."""
