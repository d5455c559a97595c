"""Analysis of finished runs: aggregation, plots and tables. It reads results only: no model is built."""
