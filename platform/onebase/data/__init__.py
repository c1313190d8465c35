"""Data: read rows from bundled or user sources, split, tokenize per task."""
