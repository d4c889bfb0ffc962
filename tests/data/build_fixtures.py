"""Rebuild the bundled sample and the dataset-layout fixtures from the shared FER-2013 zip.

Run once by a developer (`python tests/data/build_fixtures.py ../shared/datasets/fer2013.zip`);
its outputs are committed so the suite runs on a fresh clone without the shared data.
Every fixture uses real FER-2013 faces, written in the exact layout of each dataset's release.
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ASSETS = HERE.parents[1] / "ferray" / "assets"
CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
PER_SPLIT = {"Training": 3, "PublicTest": 1, "PrivateTest": 1}
USAGE = {"Training": "Training", "PublicTest": "PublicTest", "PrivateTest": "PrivateTest"}
FER_INDEX = {"angry": 0, "disgust": 1, "fear": 2, "happy": 3, "sad": 4, "surprise": 5, "neutral": 6}
RAF_CODE = {"surprise": 1, "fear": 2, "disgust": 3, "happy": 4, "sad": 5, "angry": 6, "neutral": 7}
CK_CLASS = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happy", "sad": "sadness", "surprise": "surprise"}
CK_CODE = {"anger": 1, "contempt": 2, "disgust": 3, "fear": 4, "happy": 5, "sadness": 6, "surprise": 7}
JAFFE_CODE = {"angry": "AN", "disgust": "DI", "fear": "FE", "happy": "HA", "neutral": "NE", "sad": "SA", "surprise": "SU"}


def pick(source: zipfile.ZipFile) -> list[tuple[str, str, str]]:
    """(member, class, prefix): the first few files of each class and split, in name order."""
    names = sorted(n for n in source.namelist() if n.endswith(".jpg"))
    chosen = []
    for label in CLASSES:
        for prefix, count in PER_SPLIT.items():
            folder = "train" if prefix == "Training" else "test"
            matching = [n for n in names if n.startswith(f"{folder}/{label}/{prefix}_")]
            chosen += [(n, label, prefix) for n in matching[:count]]
    return chosen


def canvas(face: np.ndarray, size: tuple[int, int], scale: int, offset: tuple[int, int]) -> np.ndarray:
    """A face upscaled bicubically and pasted on a flat grey background (a 'photo' of it)."""
    big = np.asarray(Image.fromarray(face).resize((48 * scale, 48 * scale), Image.BICUBIC))
    out = np.full((size[1], size[0]), 128, dtype=np.uint8)
    x, y = offset
    out[y : y + big.shape[0], x : x + big.shape[1]] = big
    return out


def main(zip_path: str) -> None:
    with zipfile.ZipFile(zip_path) as source:
        chosen = pick(source)
        sample = {name: source.read(name) for name, _, _ in chosen}
    # 1. The FER-2013 image-folder sample (package data for `ferray demo`, and the tests' base).
    ASSETS.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(ASSETS / "fer2013-sample.zip", "w", zipfile.ZIP_STORED) as out:
        for name, _, _ in chosen:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            out.writestr(info, sample[name])
    faces = {name: np.asarray(Image.open(io.BytesIO(data)).convert("L")) for name, data in sample.items()}

    # 2. fer2013.csv: emotion,pixels,Usage with the official header and class order.
    lines = ["emotion,pixels,Usage"]
    for name, label, prefix in chosen:
        lines.append(f"{FER_INDEX[label]},{' '.join(str(v) for v in faces[name].ravel())},{USAGE[prefix]}")
    (HERE / "fer2013-csv").mkdir(exist_ok=True)
    (HERE / "fer2013-csv" / "fer2013.csv").write_text("\n".join(lines) + "\n")

    # 3. RAF-DB basic: Image/aligned/<split>_<n>_aligned.jpg (100x100 RGB) + EmoLabel list.
    raf = HERE / "rafdb" / "basic"
    (raf / "Image" / "aligned").mkdir(parents=True, exist_ok=True)
    (raf / "EmoLabel").mkdir(parents=True, exist_ok=True)
    label_lines = []
    counters = {"train": 0, "test": 0}
    for name, label, prefix in chosen:
        split = "train" if prefix == "Training" else "test"
        counters[split] += 1
        stem = f"{split}_{counters[split]:05d}" if split == "train" else f"{split}_{counters[split]:04d}"
        rgb = Image.fromarray(faces[name]).resize((100, 100), Image.BICUBIC).convert("RGB")
        rgb.save(raf / "Image" / "aligned" / f"{stem}_aligned.jpg", quality=90)
        label_lines.append(f"{stem}.jpg {RAF_CODE[label]}")
    (raf / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(label_lines) + "\n")

    # 4. CK+48: CK+48/<class>/S<subj>_<seq>_<frame>.png, three frames per sequence, no neutral.
    ck48 = HERE / "ckplus48" / "CK+48"
    ck_full = HERE / "ckplus-full"
    training = [(n, label) for n, label, prefix in chosen if prefix == "Training" and label in CK_CLASS]
    for index, (name, label) in enumerate(training):
        subject, sequence = f"S{100 + index // 3:03d}", f"{index % 3 + 1:03d}"
        cls = CK_CLASS[label]
        folder = ck48 / cls
        folder.mkdir(parents=True, exist_ok=True)
        for frame in (8, 9, 10):
            Image.fromarray(faces[name]).save(folder / f"{subject}_{sequence}_{frame:08d}.png")
        # 5. Full CK+: cohn-kanade-images/Sxxx/yyy/*.png + Emotion/Sxxx/yyy/*_emotion.txt (last frame).
        frames = ck_full / "cohn-kanade-images" / subject / sequence
        frames.mkdir(parents=True, exist_ok=True)
        for frame in (1, 2, 3):
            photo = canvas(faces[name], (160, 120), 2, (30 + frame, 10))
            Image.fromarray(photo).save(frames / f"{subject}_{sequence}_{frame:08d}.png")
        if index % 4 != 3:  # like the release, not every sequence is labelled
            emotion = ck_full / "Emotion" / subject / sequence
            emotion.mkdir(parents=True, exist_ok=True)
            (emotion / f"{subject}_{sequence}_{3:08d}_emotion.txt").write_text(f"   {CK_CODE[cls]:.7e}\n")
    # One contempt sequence in each CK+ variant: kept with a null label.
    contempt_face = faces[training[0][0]]
    (ck48 / "contempt").mkdir(exist_ok=True)
    Image.fromarray(contempt_face).save(ck48 / "contempt" / "S200_001_00000012.png")
    frames = ck_full / "cohn-kanade-images" / "S200" / "001"
    frames.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas(contempt_face, (160, 120), 2, (30, 10))).save(frames / "S200_001_00000012.png")
    (ck_full / "Emotion" / "S200" / "001").mkdir(parents=True, exist_ok=True)
    (ck_full / "Emotion" / "S200" / "001" / "S200_001_00000012_emotion.txt").write_text(f"   {2:.7e}\n")

    # 6. JAFFE: jaffe/<subj>.<code><n>.<id>.tiff, 8-bit grey TIFF (downsized from the 256x256 originals).
    jaffe = HERE / "jaffe" / "jaffe"
    jaffe.mkdir(parents=True, exist_ok=True)
    for index, (name, label, prefix) in enumerate(c for c in chosen if c[2] == "PrivateTest"):
        photo = canvas(faces[name], (128, 128), 2, (16, 16))
        Image.fromarray(photo).save(jaffe / f"KA.{JAFFE_CODE[label]}{index % 3 + 1}.{30 + index}.tiff")


def build_demo_media(zip_path: str) -> None:
    """`ferray demo`'s media: a few photos and one short video made of real FER-2013 faces."""
    import random

    import cv2

    rng = random.Random(7)
    media = ASSETS / "demo-media"
    media.mkdir(parents=True, exist_ok=True)
    import dlib

    detector = dlib.get_frontal_face_detector()
    with zipfile.ZipFile(zip_path) as source:
        names = [n for n in sorted(source.namelist()) if n.startswith("test/") and "PrivateTest" in n]
        rng.shuffle(names)
        faces = []
        for name in names:  # frontal enough for Dlib's HOG once enlarged, as faces in real photos are
            face = np.asarray(Image.open(io.BytesIO(source.read(name))).convert("L"))
            if len(detector(canvas(face, (256, 224), 4, (20, 10)), 1)) == 1:
                faces.append(face)
            if len(faces) == 6:
                break
    for index, face in enumerate(faces[:4]):
        photo = canvas(face, (rng.randint(220, 320), rng.randint(200, 280)), rng.choice([3, 4]), (rng.randint(5, 30), rng.randint(5, 30)))
        Image.fromarray(photo).convert("RGB").save(media / f"photo_{index}.jpg", quality=88)
    writer = cv2.VideoWriter(str(media / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (256, 224))
    for frame in range(40):  # 4 s at 10 fps: two faces, then an empty second
        if frame < 30:
            face = faces[4] if frame < 15 else faces[5]
            image = canvas(face, (256, 224), 4, (20 + frame, 10))
        else:
            image = np.full((224, 256), 128, np.uint8)
        writer.write(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    writer.release()


if __name__ == "__main__":
    source = sys.argv[1] if len(sys.argv) > 1 else str(HERE.parents[2] / "shared" / "datasets" / "fer2013.zip")
    main(source)
    build_demo_media(source)
