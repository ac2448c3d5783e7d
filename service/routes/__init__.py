"""One router per resource; `service.main` mounts them, with the API key check on all but health."""
