"""Base models: where they come from (bundled, local, hub) and how task heads are put on."""
