"""The xatl service: an OpenAI-compatible completions endpoint over the constant-memory engine,
model listing, Prometheus metrics and a health check. `xatl serve` starts it (see `service.cli`);
`create_app` in `service.main` builds the application."""
