"""Aggregation (pandas), tables (Markdown, LaTeX, CSV) and figures (matplotlib), from result.json files only."""
