"""The recipes: a training run and its memory plan, composed of named stages (stages.py) other tools reuse."""
