"""HTTP API (FastAPI). Never imports torch (DESIGN.md §2); built in a later issue."""
