"""GPU worker: job contract, continuous-batching engine, RQ loop; built in a later issue."""
