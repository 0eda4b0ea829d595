"""slm-playground: `python app.py` starts the Gradio playground (see --help).

Host and port come from --host / --port, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else
127.0.0.1:7860. Analytics are off. On a Hugging Face Space this file is the app_file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from ui import build_app, launch_options
from ui.common import AppSettings, pick_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"),
                        help="folder of checkpoints and training runs (default: ./checkpoints)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="folder of local and uploaded training text (default: ./data)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--device", default=None, help="torch device for the playground's models (default: cuda if "
                                                       "available, else cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = pick_device(args.device)
    settings = AppSettings(args.checkpoints.resolve(), args.data_dir.resolve(), device, dtype)
    settings.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())


if __name__ == "__main__":
    main()
