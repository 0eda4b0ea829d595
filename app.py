"""slm-playground: `python app.py` starts the Gradio playground (see --help).

Every setting is a flag, and also an environment variable, because a Hugging Face Space runs
`python app.py` with no flags: SLM_CHECKPOINTS, SLM_DATA_DIR, SLM_DEFAULT_MODEL, SLM_DEMO=1 (a public
demo: no training, uploads or Hub downloads). Host and port come from --host / --port, else
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else 127.0.0.1:7860. Analytics are off. On a Space this file
is the app_file; on ZeroGPU hardware training is refused and generation runs without torch.compile.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from slm.hub import is_repo_id
from slm.limits import DEFAULT_MAX_UPLOAD_MB


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=Path(env("SLM_CHECKPOINTS") or "checkpoints"),
                        help="folder of checkpoints and training runs (default: $SLM_CHECKPOINTS or ./checkpoints)")
    parser.add_argument("--data-dir", type=Path, default=Path(env("SLM_DATA_DIR") or "data"),
                        help="folder of local and uploaded training text (default: $SLM_DATA_DIR or ./data)")
    parser.add_argument("--default-model", default=env("SLM_DEFAULT_MODEL") or None,
                        help="the model a new visitor gets: a folder inside the checkpoint folder as the picker "
                             "names it (e.g. my-run/best), or a Hub repo id (owner/name, downloaded at start). "
                             "Default: $SLM_DEFAULT_MODEL, else the best checkpoint of the most recent run that "
                             "trained for at least 50 steps")
    parser.add_argument("--demo", action=argparse.BooleanOptionalAction, default=_env_flag("SLM_DEMO"),
                        help="public demo: generation, step by step and inspection for everyone; training, uploads "
                             "and Hub downloads off (default: on when $SLM_DEMO=1)")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")),
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


def settings_from_args(args: argparse.Namespace):
    """The app's settings from the flags (each of which has an environment variable behind it)."""
    from ui.common import AppSettings, on_zero_gpu, pick_device

    device, dtype = pick_device(args.device)
    return AppSettings(
        args.checkpoints.resolve(), args.data_dir.resolve(), device, dtype, max_upload_mb=args.max_upload_mb,
        default_model=args.default_model, demo=args.demo, zero_gpu=on_zero_gpu(),
    )


def fetch_default_model(settings, registry) -> str | None:
    """A default model given as a Hub repo id (owner/name) that is no folder here is downloaded at start
    (a Space keeps its model on the Hub); returns the picker value to greet visitors with."""
    name = (settings.default_model or "").strip()
    if not name or (settings.checkpoints_dir / name).exists() or not is_repo_id(name):
        return name or None
    try:
        return registry.download_from_hub(name)
    except ValueError as exc:
        print(f"warning: the default model {name} could not be downloaded: {exc}", file=sys.stderr)
        return name


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
    from ui.models import ModelRegistry

    try:
        settings = settings_from_args(args)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else "not a device name"
        print(f"error: --device {args.device!r} is not usable here ({reason}); use cpu, cuda or cuda:N",
              file=sys.stderr)
        return 2
    try:
        settings.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the app's folders: {exc}", file=sys.stderr)
        return 2
    settings.default_model = fetch_default_model(settings, ModelRegistry(settings))
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
