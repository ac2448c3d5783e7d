"""Request and response bodies, one module per resource, in OpenAI's shapes."""
