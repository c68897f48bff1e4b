"""Channel-importance estimators, streamed statistics and analysis reports."""
