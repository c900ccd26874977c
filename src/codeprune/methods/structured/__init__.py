"""structured."""
