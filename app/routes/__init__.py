"""The API's routers: generations, models, health and metrics."""
