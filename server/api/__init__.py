"""The HTTP layer: protocol models and the FastAPI app."""
