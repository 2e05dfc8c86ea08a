"""openrlaif: Ray-based RLHF/RLAIF."""
