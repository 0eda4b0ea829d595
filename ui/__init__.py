"""The Gradio playground: one module per tab, assembled by `build_app`."""

from .app import build_app, launch_options

__all__ = ["build_app", "launch_options"]
