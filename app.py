"""slm-playground: `python app.py` starts the Gradio playground (see --help).

Host and port come from --host / --port, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else
127.0.0.1:7860. Analytics are off. On a Hugging Face Space this file is the app_file.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from slm.limits import DEFAULT_MAX_UPLOAD_MB


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
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest training-text upload accepted, in MB (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--device", default=None, help="torch device for the playground's models (default: cuda if "
                                                       "available, else cpu)")
    return parser.parse_args(argv)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port must be between 1 and 65535, got {args.port}", file=sys.stderr)
        return 2
    if not args.max_upload_mb > 0:
        print(f"error: --max-upload-mb must be above 0, got {args.max_upload_mb:g}", file=sys.stderr)
        return 2
    if not port_free(args.host, args.port):
        print(f"error: port {args.port} on {args.host} is already in use (another playground?); "
              f"choose another with --port {args.port + 1}", file=sys.stderr)
        return 2
    from ui import build_app, launch_options  # gradio: imported once the arguments are known to be usable
    from ui.common import AppSettings, pick_device

    try:
        device, dtype = pick_device(args.device)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else "not a device name"
        print(f"error: --device {args.device!r} is not usable here ({reason}); use cpu, cuda or cuda:N",
              file=sys.stderr)
        return 2
    settings = AppSettings(args.checkpoints.resolve(), args.data_dir.resolve(), device, dtype,
                           max_upload_mb=args.max_upload_mb)
    try:
        settings.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the app's folders: {exc}", file=sys.stderr)
        return 2
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=2)
    try:
        demo.launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb:g}mb",
                    **launch_options())
    except OSError as exc:  # taken between the check and the launch; Gradio's own text names its env variables
        print(f"error: cannot listen on {args.host}:{args.port} ({type(exc).__name__}); "
              f"choose another port with --port {args.port + 1}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
