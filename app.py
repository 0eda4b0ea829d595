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
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from ui import build_app, launch_options
from ui.common import AppSettings, on_zero_gpu, pick_device
from ui.models import REPO_ID, ModelRegistry


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
    parser.add_argument("--device", default=None, help="torch device for the playground's models (default: cuda if "
                                                       "available, else cpu)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> AppSettings:
    device, dtype = pick_device(args.device)
    return AppSettings(
        args.checkpoints.resolve(), args.data_dir.resolve(), device, dtype,
        default_model=args.default_model, demo=args.demo, zero_gpu=on_zero_gpu(),
    )


def fetch_default_model(settings: AppSettings) -> str | None:
    """A default model given as a Hub repo id (owner/name) that is no folder here is downloaded at start
    (a Space keeps its model on the Hub); returns the picker value to greet visitors with."""
    name = (settings.default_model or "").strip()
    if not name or (settings.checkpoints_dir / name).exists() or not REPO_ID.match(name):
        return name or None
    try:
        return ModelRegistry(settings).download_from_hub(name)
    except ValueError as exc:
        print(f"warning: the default model {name} could not be downloaded: {exc}")
        return name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)
    settings.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.default_model = fetch_default_model(settings)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())


if __name__ == "__main__":
    main()
