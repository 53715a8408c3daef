"""The training application: typed YAML configs, data, model zoo, checkpoints, the run-folder runner."""
