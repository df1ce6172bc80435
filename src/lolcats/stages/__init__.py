"""Training recipes: plain loops a reader can follow top to bottom."""
