"""The `wildseg` command: a thin click layer over the Python API, one module per command (`segment`, `evaluate`,
`export`, `models`, `demo`), the group and its error handling in `app`."""

from . import demo, evaluate, export, models, segment
from .app import main

for command in (segment.segment, evaluate.evaluate_command, export.export, models.models, demo.demo):
    main.add_command(command)

__all__ = ["main"]
