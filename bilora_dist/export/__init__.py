"""Writing adapters (PEFT, vLLM) and merged models, and the export command."""
