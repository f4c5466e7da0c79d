"""Long-context evaluation: needle-in-a-haystack retrieval and loss by position."""
