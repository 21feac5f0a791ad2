"""Predicted masks of an evaluation saved as `<id>.png`, with the settings that made them, for a later run to
reuse."""

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..datasets.base import read_label_image
from ..errors import WildsegError, first_line, setting
from ..files import write_atomically, write_json
from ..outputs import label_palette, mask_image

SETTINGS_FILE = "settings.json"


class PredictionStore:
    """Predicted masks saved as `<id>.png` (palette PNG, value = class index), reusable by a later run.

    `settings.json` records what produced them; a run with other settings is refused the folder rather than
    mixing predictions.
    """

    def __init__(self, folder: Path, settings: dict, classes: int):
        self.folder, self.classes, self.palette = Path(folder), classes, label_palette(max(classes, 1))
        record = self.folder / SETTINGS_FILE
        if self.folder.exists() and not self.folder.is_dir():
            raise WildsegError(f"{setting('save_predictions')} {folder} is a file: give a folder")
        settings = json.loads(json.dumps(settings))
        if record.is_file():
            previous = _read_settings(record)
            changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
            if changed:
                raise WildsegError(
                    f"{folder} holds predictions made with other settings ({', '.join(changed)} differ): "
                    f"use a new {setting('save_predictions')} folder, or the same settings to resume"
                )
        elif self.folder.is_dir() and any(self.folder.glob("*.png")):
            raise WildsegError(f"{folder} holds PNG files that wildseg eval did not write: give an empty folder")
        else:
            write_json(record, settings, "the settings of the saved predictions")

    def path(self, image_id: str) -> Path:
        return self.folder / f"{image_id}.png"

    def load(self, image_id: str, shape: tuple[int, int]) -> Optional[np.ndarray]:
        """A saved prediction of the given shape, or None when there is none (or it does not fit: unreadable,
        another shape, or a value that is no class)."""
        if not self.path(image_id).is_file():
            return None
        try:
            prediction = read_label_image(self.path(image_id))
        except WildsegError:
            return None
        return prediction if prediction.shape == shape and prediction.max() < self.classes else None

    def save(self, image_id: str, prediction: np.ndarray) -> None:
        write_atomically(self.path(image_id), lambda path: mask_image(prediction, self.palette).save(path, "PNG"))


def _read_settings(record: Path) -> dict:
    try:
        settings = json.loads(record.read_text())
    except (OSError, ValueError) as error:
        raise WildsegError(f"cannot read {record} ({first_line(error)}): delete it with the predictions beside it, "
                           f"or use a new {setting('save_predictions')} folder") from None
    if not isinstance(settings, dict):
        raise WildsegError(f"{record} is not a wildseg eval settings file: use a new {setting('save_predictions')} "
                           "folder")
    return settings


