"""Writes a small MMVP-style benchmark in MMVP-VLM's own layout (``Questions.csv`` + ``MLLM_VLM Images/<type>/<id>.jpg``)
from the Twitter emoji set (scripts/get_demo_data.sh): pairs of emoji that differ in one visual property, each with
a statement written for it, in 7 of MMVP's 9 patterns (no emoji pairs fit "Texts" and "Viewpoint and
Perspective"). Models trained on the Noto emoji never saw these drawings.

    python scripts/make_mmvp_emoji.py data/sources/emoji-datasource-twitter data/mmvp_emoji
"""

import csv
import json
import sys
from pathlib import Path

from diffclip.images import load_image

PAIRS = [  # (pattern, emoji 1, emoji 2, statement 1, statement 2)
    ("Orientation and Direction", "upwards black arrow", "downwards black arrow", "an arrow pointing up",
     "an arrow pointing down"),
    ("Orientation and Direction", "leftwards black arrow", "black rightwards arrow", "an arrow pointing left",
     "an arrow pointing right"),
    ("Orientation and Direction", "thumbs up sign", "thumbs down sign", "a thumb pointing up", "a thumb pointing down"),
    ("Presence of Specific Features", "smiling face with sunglasses", "grinning face", "a face wearing sunglasses",
     "a face without sunglasses"),
    ("Presence of Specific Features", "house with garden", "house building", "a house with a garden",
     "a house without a garden"),
    ("Presence of Specific Features", "snowman", "snowman without snow", "a snowman in falling snow",
     "a snowman without snow"),
    ("State and Condition", "full moon symbol", "new moon symbol", "a full moon", "a new moon"),
    ("State and Condition", "lock", "open lock", "a closed lock", "an open lock"),
    ("State and Condition", "closed book", "open book", "a closed book", "an open book"),
    ("Quantity and Count", "keycap 1", "keycap 2", "the number one", "the number two"),
    ("Quantity and Count", "keycap 3", "keycap 8", "the number three", "the number eight"),
    ("Quantity and Count", "two men holding hands", "man and woman holding hands", "two men holding hands",
     "a man and a woman holding hands"),
    ("Positional and Relational Context", "sun behind cloud", "cloud", "the sun behind a cloud", "a cloud alone"),
    ("Positional and Relational Context", "lock with ink pen", "lock", "a lock with a pen in front of it",
     "a lock alone"),
    ("Color and Appearance", "heavy black heart", "blue heart", "a red heart", "a blue heart"),
    ("Color and Appearance", "red apple", "green apple", "a red apple", "a green apple"),
    ("Color and Appearance", "green heart", "yellow heart", "a green heart", "a yellow heart"),
    ("Structural Characteristics", "dog face", "dog", "the face of a dog", "a whole dog"),
    ("Structural Characteristics", "cat face", "cat", "the face of a cat", "a whole cat"),
    ("Structural Characteristics", "hourglass", "hourglass with flowing sand", "an empty hourglass",
     "an hourglass with flowing sand"),
]


def main(source: str, out: str) -> None:
    src, dst = Path(source), Path(out)
    catalogue = {e["name"].lower(): e for e in json.loads((src / "emoji.json").read_text())}
    rows, qid = [["Question ID", "Type", "Statement"]], 1
    for pattern, e1, e2, s1, s2 in PAIRS:
        for q, name, statement in ((qid, e1, s1), (qid + 1, e2, s2)):
            img = load_image(src / "img" / "twitter" / "64" / catalogue[name]["image"], background=(255, 255, 255))
            path = dst / "MLLM_VLM Images" / pattern / f"{q}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, quality=95)
            rows.append([str(q), pattern, statement])
        qid += 2
    with open(dst / "Questions.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    print(f"wrote {len(PAIRS)} pairs to {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
