"""The engine: schedules, micro-batches, devices, cuts, stages, executor, PipelineModel, verify (no files, no CLI)."""
