"""GPU worker: job contract, continuous-batching engine, RQ loop and its Redis writes."""
