"""The per-rank memory plan, the activation trace and the recompute choice."""
