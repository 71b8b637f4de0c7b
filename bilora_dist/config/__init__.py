"""Configuration: the training flags and YAML, and users' DeepSpeed JSON configs."""
