"""User-facing tools that work on files (checkpoint consolidation)."""
