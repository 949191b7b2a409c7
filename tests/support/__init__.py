"""What several test modules share: oracles, helpers, fixtures' building blocks (no test module imports another)."""
