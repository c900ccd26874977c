"""unstructured."""
