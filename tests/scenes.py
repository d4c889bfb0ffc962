"""Videos of several people with known identities and expressions, for the tracking tests and bench.

Each person is a sequence of real 48×48 FER-2013 faces (one per expression interval, so "a person" is
a place on screen carrying faces of that person's expressions), enlarged and pasted into grey frames
along a path, and written with OpenCV. `truth` says who is where, with which expression, at any time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

SIZE = (480, 240)  # frame width, height
SCALE = 3  # a 48 px face becomes 144 px: HOG finds it without upsampling


@dataclass(frozen=True)
class Person:
    """Who is on screen when, where (top-left of the pasted face, a function of time) and how they feel."""

    name: str
    # (from s, to s, label name, a 48×48 face, or a list of faces of that expression shown in turn,
    # a new one every 1/`turns` s: frame-to-frame variation, so the model's errors are independent)
    expressions: list[tuple[float, float, str, np.ndarray | list[np.ndarray]]]
    at: Callable[[float], tuple[float, float]]
    hidden: list[tuple[float, float]] = field(default_factory=list)  # [from, to) off screen
    turns: float = 10.0

    def label(self, t: float) -> str | None:
        """The expression shown at time t, None when off screen."""
        if any(a <= t < b for a, b in self.hidden):
            return None
        return next((name for a, b, name, _ in self.expressions if a <= t < b), None)

    def face(self, t: float) -> np.ndarray | None:
        if self.label(t) is None:
            return None
        face = next(face for a, b, _, face in self.expressions if a <= t < b)
        return face[int(t * self.turns + 1e-6) % len(face)] if isinstance(face, list) else face


def still(x: float, y: float) -> Callable[[float], tuple[float, float]]:
    return lambda t: (x, y)


def moving(x0: float, x1: float, y: float, seconds: float) -> Callable[[float], tuple[float, float]]:
    return lambda t: (x0 + (x1 - x0) * min(1.0, t / seconds), y)


@dataclass(frozen=True)
class Scene:
    people: list[Person]
    seconds: float
    fps: float = 10.0
    jitter: int = 0  # px of random shift per frame and person
    noise: float = 0.0  # grey levels of Gaussian noise per frame
    seed: int = 0

    def frames(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        width, height = SIZE
        background = np.tile(np.linspace(60, 150, width), (height, 1))
        out = []
        for k in range(int(round(self.seconds * self.fps))):
            t = k / self.fps
            frame = background.copy()
            for person in self.people:
                face = person.face(t)
                if face is None:
                    continue
                big = cv2.resize(face, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_CUBIC)
                x, y = person.at(t)
                dx, dy = rng.integers(-self.jitter, self.jitter + 1, 2) if self.jitter else (0, 0)
                x, y = int(round(x)) + int(dx), int(round(y)) + int(dy)
                h, w = big.shape
                x, y = max(0, min(width - w, x)), max(0, min(height - h, y))
                frame[y : y + h, x : x + w] = big
            if self.noise:
                frame = frame + rng.normal(0, self.noise, frame.shape)
            out.append(np.clip(frame, 0, 255).astype(np.uint8))
        return out

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, SIZE)
        assert writer.isOpened()
        for frame in self.frames():
            writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
        writer.release()
        return path

    def who(self, t: float, bbox: list[int]) -> str:
        """The person on screen at t whose pasted face is nearest a detected box's centre."""
        cx, cy = bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2
        half = 48 * SCALE / 2

        def distance(person: Person) -> float:
            x, y = person.at(t)
            return math.hypot(x + half - cx, y + half - cy)

        return min((p for p in self.people if p.label(t) is not None), key=distance).name

    def truth(self, name: str, t: float) -> str | None:
        return next(p for p in self.people if p.name == name).label(t)
