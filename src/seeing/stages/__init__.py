"""What every training stage shares at the Trainer level (progress display)."""
