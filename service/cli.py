"""`xatl serve [--host] [--port] [--data-dir DIR] [--models-dir DIR]`: start the service.

Options override the environment (`XATL_HOST`, `XATL_PORT`, `XATL_HOME`, `XATL_MODELS_DIR`, and
the other `XATL_` settings of `service.config.Settings`). Without `XATL_API_KEYS`, the key stored
in the data directory is used, or one is made, stored there and printed.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--data-dir", help="the service's own files: API key, models/ (default ./data)")
    parser.add_argument("--models-dir", help="folder of servable models (default <data-dir>/models)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.config import Settings
    from service.keys import KEY_FILE, create_stored_key, read_stored_key
    from service.main import create_app

    given = {"host": args.host, "port": args.port, "data_dir": args.data_dir, "models_dir": args.models_dir}
    settings = Settings(**{name: value for name, value in given.items() if value is not None})
    if settings.api_keys:
        print(f"API keys: {len(settings.api_keys)} from XATL_API_KEYS")
    elif read_stored_key(settings.data_dir):
        print(f"API key: the one stored in {settings.data_dir / KEY_FILE}")
    else:
        key = create_stored_key(settings.data_dir)
        print(f"API key (new, stored in {settings.data_dir / KEY_FILE}): {key}")
    print(f"models: {settings.resolved_models_dir.resolve()}")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)
    return 0
