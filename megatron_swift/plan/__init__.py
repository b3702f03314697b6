"""Layout planning: per-rank memory of a model under a parallel layout (memory.py), candidate layouts
ranked by estimated step time (search.py), and what the trainer really allocated (measure.py)."""
