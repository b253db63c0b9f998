"""The worker (`ddpm worker`) and the job contract it shares with the API: the RQ loop,
the continuous-batching engine and the Redis writes between them (ARCHITECTURE.md).
`contract` and `client` are torch-free: the API imports them."""
