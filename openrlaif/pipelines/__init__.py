"""Driver loops, one per pipeline."""
